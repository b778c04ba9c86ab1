//! Keyfactor's paging and query conventions for `GET OrchestratorJobs/JobHistory`
//! (`reference/keyfactor.md` §6), as strict as Command is:
//!
//! - `pq.queryString`: clauses `Field -op Value` with `-eq -ne -gt -ge -lt -le -contains`,
//!   joined by `AND` / `OR` (any case; `AND` binds tighter) and grouped by parentheses; values
//!   bare or in double quotes. Only the fields the API documents for JobHistory queries are
//!   accepted ([`QUERY_FIELDS`]); any other field (`JobHistoryId` included) is a 400 with a
//!   message naming it, as Command answers.
//! - `pq.sortField` (one of [`QUERY_FIELDS`], else 400), `pq.sortAscending` (0 = ascending,
//!   1 = descending), `pq.pageReturned` (1-based, default 1) and `pq.returnLimit` (default 50).
//!
//! Parameter names match without regard to case, with or without the `pq.` prefix, as callers
//! send both. How a documented field is matched against a row (the response has no `Agent`,
//! `AgentId`, `TargetPath` or `ScheduleType` key) is the stand-in's reading of the docs, marked
//! \[I\] in `reference/keyfactor.md`: `Agent` is the row's `AgentMachine`, `AgentId` the id of
//! the agent (`GET /Agents`) with that `ClientMachine`, `TargetPath` the row's `StorePath`,
//! `ScheduleType` the kind of the row's `Schedule` (`Immediate`, `Interval`, ...). `Result`
//! and `Status` are numbers (§3); a name (`"Failure"`) is accepted for them too.
//!
//! Two of those readings are known to differ from the query documentation, which lists
//! `JobType` values as the logical jobs (`Inventory`, `Management`, `Reenrollment`, ...) and
//! `ScheduleType` values as codes (`I_` for interval, `D_`, `W_`, `M_`, `O_`, null for
//! immediately), while the stand-in compares the row's own values (`WinCertInventory`,
//! `Interval`). Nothing in jobhook queries either field; a handler that does must be tried
//! against a real Command, not only here.

use std::cmp::Ordering;

use serde_json::Value;

/// Default page size (Keyfactor's documented default).
pub const DEFAULT_RETURN_LIMIT: usize = 50;

/// Largest `pq.returnLimit` honoured: bounds one answer.
pub const MAX_RETURN_LIMIT: usize = 10_000;

/// Longest `pq.queryString` parsed: a real query is a few clauses; this bounds the parser's work
/// on a hostile one.
pub const MAX_QUERY_BYTES: usize = 4096;

/// Deepest nesting of parentheses accepted (the parser recurses once per level).
pub const MAX_NESTING: usize = 16;

/// The fields the Command API documents for JobHistory queries.
pub const QUERY_FIELDS: &[&str] = &[
    "AgentId",
    "Agent",
    "JobId",
    "Result",
    "Status",
    "JobType",
    "Message",
    "OperationStart",
    "ScheduleType",
    "TargetPath",
];

/// JobHistory `Result` names and numbers (§3.1).
const RESULTS: &[(&str, i64)] = &[
    ("Unknown", 0),
    ("Success", 2),
    ("Warning", 3),
    ("Failure", 4),
];

/// JobHistory `Status` names and numbers (§3.1).
const STATUSES: &[(&str, i64)] = &[
    ("Unknown", 0),
    ("Waiting", 1),
    ("InProcess", 2),
    ("Completed", 3),
    ("Acknowledged", 4),
    ("CompletedWillRetry", 5),
];

/// A query: filter, sort, page.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    filter: Option<Expr>,
    sort_field: Option<&'static str>,
    descending: bool,
    page: usize,
    limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Clause(Clause),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
struct Clause {
    field: &'static str,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Contains,
}

/// The documented field named `name` (any case), or Command's kind of 400 message.
fn documented(name: &str) -> Result<&'static str, String> {
    QUERY_FIELDS
        .iter()
        .find(|f| f.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            format!(
                "The field '{name}' is not a valid query field for JobHistory. Valid fields: {}.",
                QUERY_FIELDS.join(", ")
            )
        })
}

impl Query {
    /// Reads the paging and query parameters from decoded query pairs; the error is the message
    /// of a 400 answer.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Query, String> {
        let mut query = Query {
            filter: None,
            sort_field: None,
            descending: false,
            page: 1,
            limit: DEFAULT_RETURN_LIMIT,
        };
        for (name, value) in pairs {
            let lower = name.to_ascii_lowercase();
            let key = lower.strip_prefix("pq.").unwrap_or(&lower);
            match key {
                "querystring" => query.filter = parse_query_string(value)?,
                "sortfield" => query.sort_field = Some(documented(value.trim())?),
                "sortascending" => {
                    query.descending = match value.trim() {
                        "0" => false,
                        "1" => true,
                        other => {
                            return Err(format!(
                                "The value '{other}' is not valid for SortAscending."
                            ));
                        }
                    }
                }
                "pagereturned" => query.page = positive(value, "PageReturned")?,
                "returnlimit" => {
                    query.limit = positive(value, "ReturnLimit")?.min(MAX_RETURN_LIMIT)
                }
                _ => {}
            }
        }
        Ok(query)
    }

    /// Filters, sorts and pages `rows`; `agents` are the `GET /Agents` objects (for `AgentId`).
    pub fn apply(&self, rows: &[Value], agents: &[Value]) -> Vec<Value> {
        let mut selected: Vec<&Value> = rows
            .iter()
            .filter(|row| self.filter.as_ref().is_none_or(|f| f.matches(row, agents)))
            .collect();
        // Without a sort field the rows come in their stored order (by JobHistoryId).
        if let Some(sort_field) = self.sort_field {
            selected.sort_by(|a, b| {
                let ordering = compare_values(
                    field(a, sort_field, agents).as_ref(),
                    field(b, sort_field, agents).as_ref(),
                );
                if self.descending {
                    ordering.reverse()
                } else {
                    ordering
                }
            });
        } else {
            selected.sort_by(|a, b| {
                let ordering = compare_values(a.get("JobHistoryId"), b.get("JobHistoryId"));
                if self.descending {
                    ordering.reverse()
                } else {
                    ordering
                }
            });
        }
        let skip = (self.page - 1).saturating_mul(self.limit);
        selected
            .into_iter()
            .skip(skip)
            .take(self.limit)
            .cloned()
            .collect()
    }
}

fn positive(value: &str, name: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("The value '{value}' is not valid for {name}.")),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open,
    Close,
    Word(String),
    Quoted(String),
}

/// Splits a query string into words, quoted values and parentheses.
fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '"' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => return Err("Unterminated quoted value in query string.".into()),
                    }
                }
                tokens.push(Token::Quoted(value));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '(' || c == ')' || c == '"' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn or(&mut self, depth: usize) -> Result<Expr, String> {
        let mut terms = vec![self.and(depth)?];
        while self.keyword("OR") {
            self.next();
            terms.push(self.and(depth)?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self, depth: usize) -> Result<Expr, String> {
        let mut factors = vec![self.factor(depth)?];
        while self.keyword("AND") {
            self.next();
            factors.push(self.factor(depth)?);
        }
        Ok(if factors.len() == 1 {
            factors.remove(0)
        } else {
            Expr::And(factors)
        })
    }

    fn factor(&mut self, depth: usize) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Open) => {
                if depth >= MAX_NESTING {
                    return Err("The query string is nested too deeply.".into());
                }
                let inner = self.or(depth + 1)?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err("Unbalanced parentheses in query string.".into()),
                }
            }
            Some(Token::Word(field)) => {
                let field = documented(&field)?;
                let op = match self.next() {
                    Some(Token::Word(op)) => match op.to_ascii_lowercase().as_str() {
                        "-eq" => Op::Eq,
                        "-ne" => Op::Ne,
                        "-gt" => Op::Gt,
                        "-ge" => Op::Ge,
                        "-lt" => Op::Lt,
                        "-le" => Op::Le,
                        "-contains" => Op::Contains,
                        _ => return Err(format!("Unknown operator '{op}' in query string.")),
                    },
                    _ => return Err(format!("Invalid query string clause at '{field}'.")),
                };
                let value = match self.next() {
                    Some(Token::Word(v) | Token::Quoted(v)) => v,
                    _ => return Err(format!("Invalid query string clause at '{field}'.")),
                };
                Ok(Expr::Clause(Clause { field, op, value }))
            }
            Some(Token::Close) => Err("Unbalanced parentheses in query string.".into()),
            Some(Token::Quoted(v)) => Err(format!("Invalid query string clause at '\"{v}\"'.")),
            None => Err("The query string ends in the middle of a clause.".into()),
        }
    }
}

/// Parses a whole query string; an empty one selects everything.
fn parse_query_string(text: &str) -> Result<Option<Expr>, String> {
    if text.len() > MAX_QUERY_BYTES {
        return Err("The query string is too long.".into());
    }
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut parser = Parser { tokens, at: 0 };
    let expr = parser.or(0)?;
    match parser.peek() {
        None => Ok(Some(expr)),
        Some(_) => Err("Unexpected text after the end of the query string.".into()),
    }
}

/// The value of documented field `name` for `row` (see the module docs).
fn field(row: &Value, name: &str, agents: &[Value]) -> Option<Value> {
    let get = |key: &str| row.get(key).cloned();
    match name {
        "Agent" => get("AgentMachine"),
        "AgentId" => {
            let machine = row.get("AgentMachine")?.as_str()?;
            agents
                .iter()
                .find(|a| {
                    a.get("ClientMachine")
                        .and_then(Value::as_str)
                        .is_some_and(|m| m.eq_ignore_ascii_case(machine))
                })
                .and_then(|a| a.get("AgentId").cloned())
        }
        "TargetPath" => get("StorePath"),
        "ScheduleType" => row
            .get("Schedule")?
            .as_object()?
            .keys()
            .next()
            .map(|k| Value::String(k.clone())),
        other => get(other),
    }
}

/// A clause value for `Result`/`Status` given by name becomes its number.
fn numeric_name(field: &str, value: &str) -> Option<String> {
    let table = match field {
        "Result" => RESULTS,
        "Status" => STATUSES,
        _ => return None,
    };
    table
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, n)| n.to_string())
}

fn compare_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => {
            x.to_ascii_lowercase().cmp(&y.to_ascii_lowercase())
        }
        (None | Some(Value::Null), None | Some(Value::Null)) => Ordering::Equal,
        (None | Some(Value::Null), _) => Ordering::Less,
        (_, None | Some(Value::Null)) => Ordering::Greater,
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
    }
}

impl Expr {
    fn matches(&self, row: &Value, agents: &[Value]) -> bool {
        match self {
            Expr::Clause(c) => c.matches(row, agents),
            Expr::And(all) => all.iter().all(|e| e.matches(row, agents)),
            Expr::Or(any) => any.iter().any(|e| e.matches(row, agents)),
        }
    }
}

impl Clause {
    fn matches(&self, row: &Value, agents: &[Value]) -> bool {
        let Some(actual) = field(row, self.field, agents) else {
            return false;
        };
        let wanted = numeric_name(self.field, &self.value).unwrap_or_else(|| self.value.clone());
        let ordering = match &actual {
            Value::Number(n) => match (n.as_f64(), wanted.parse::<f64>()) {
                (Some(a), Ok(b)) => a.partial_cmp(&b),
                _ => None,
            },
            Value::String(s) => Some(s.to_ascii_lowercase().cmp(&wanted.to_ascii_lowercase())),
            Value::Bool(b) => Some(b.to_string().cmp(&wanted.to_ascii_lowercase())),
            Value::Null => Some(if wanted.eq_ignore_ascii_case("null") {
                Ordering::Equal
            } else {
                Ordering::Less
            }),
            _ => None,
        };
        match self.op {
            Op::Contains => actual.as_str().is_some_and(|s| {
                s.to_ascii_lowercase()
                    .contains(&wanted.to_ascii_lowercase())
            }),
            Op::Eq => ordering == Some(Ordering::Equal),
            Op::Ne => ordering != Some(Ordering::Equal),
            Op::Gt => ordering == Some(Ordering::Greater),
            Op::Ge => matches!(ordering, Some(Ordering::Greater | Ordering::Equal)),
            Op::Lt => ordering == Some(Ordering::Less),
            Op::Le => matches!(ordering, Some(Ordering::Less | Ordering::Equal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, FAILING_JOB_ID, INVENTORY_JOB_ID};

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn ids(rows: &[Value]) -> Vec<u64> {
        rows.iter()
            .map(|r| r["JobHistoryId"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn filters_sorts_and_pages() {
        let data = Dataset::seeded();
        let q = |p: &[(&str, &str)]| {
            Query::from_pairs(&pairs(p))
                .unwrap()
                .apply(&data.job_history, &data.agents)
        };

        let by_job = format!("JobID -eq \"{INVENTORY_JOB_ID}\"");
        assert_eq!(
            ids(&q(&[("pq.queryString", &by_job)])),
            [2168, 2169, 2170, 2171]
        );
        let combined = format!(
            "JobId -eq \"{INVENTORY_JOB_ID}\" AND OperationStart -gt \"2023-05-06T00:28:00\""
        );
        assert_eq!(ids(&q(&[("pq.queryString", &combined)])), [2170, 2171]);
        assert_eq!(
            ids(&q(&[
                ("queryString", &by_job),
                ("sortField", "OperationStart"),
                ("sortAscending", "1")
            ])),
            [2171, 2170, 2169, 2168]
        );
        assert_eq!(
            ids(&q(&[
                ("pq.queryString", &by_job),
                ("pq.returnLimit", "3"),
                ("pq.pageReturned", "2")
            ])),
            [2171]
        );
        assert_eq!(
            ids(&q(&[("PageReturned", "1"), ("ReturnLimit", "2")])),
            [2160, 2164]
        );
        assert_eq!(q(&[("pq.queryString", "Result -eq \"Failure\"")]).len(), 3);
        assert_eq!(q(&[("pq.queryString", "Result -eq 4")]).len(), 3);
        assert_eq!(
            q(&[("pq.queryString", "Message -contains \"permission\"")]).len(),
            3
        );
        assert_eq!(
            q(&[(
                "pq.queryString",
                "Status -eq \"Completed\" and Result -ne \"Success\""
            )])
            .len(),
            1
        );
        // OR, parentheses and AND binding tighter than OR.
        let either = format!(
            "(JobId -eq \"{FAILING_JOB_ID}\" OR JobType -eq \"WinCertReenrollment\") AND Status -eq 5"
        );
        assert_eq!(ids(&q(&[("pq.queryString", &either)])), [2160, 2164, 2175]);
        let precedence = format!(
            "JobType -eq \"WinCertReenrollment\" OR JobId -eq \"{FAILING_JOB_ID}\" AND OperationStart -ge \"2023-05-06T00:10:00\""
        );
        assert_eq!(ids(&q(&[("pq.queryString", &precedence)])), [2172, 2175]);
        // The fields the docs use that are not keys of a row.
        assert_eq!(
            q(&[("pq.queryString", "Agent -eq \"orchestrator.kftrain.lab\"")]).len(),
            9
        );
        assert_eq!(
            q(&[(
                "pq.queryString",
                &format!("AgentId -eq \"{}\"", crate::data::AGENT_ID)
            )])
            .len(),
            9
        );
        assert_eq!(
            q(&[(
                "pq.queryString",
                "TargetPath -eq \"/etc/ssl/app/certs.pem\""
            )])
            .len(),
            3
        );
        assert_eq!(
            q(&[("pq.queryString", "ScheduleType -eq Immediate")]).len(),
            2
        );
    }

    #[test]
    fn bad_queries_are_errors() {
        assert!(Query::from_pairs(&pairs(&[("pq.returnLimit", "x")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.pageReturned", "0")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.sortAscending", "yes")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", "JobId ~ 1")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", "JobId")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", "Nope -eq 1")])).is_err());
        for hostile in [
            "(JobId -eq 1",
            "JobId -eq 1)",
            "JobId -eq \"1",
            "JobId -eq 1 AND",
            "JobId -eq 1 JobId -eq 2",
            "\"x\"",
            "()",
        ] {
            assert!(
                Query::from_pairs(&pairs(&[("pq.queryString", hostile)])).is_err(),
                "{hostile}"
            );
        }
        let deep = format!("{}JobId -eq 1{}", "(".repeat(100), ")".repeat(100));
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", &deep)])).is_err());
        let long = "JobId -eq 1 OR ".repeat(1000);
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", &long)])).is_err());
    }

    #[test]
    fn undocumented_fields_are_refused_like_command_does() {
        let refused = Query::from_pairs(&pairs(&[("pq.queryString", "JobHistoryId -gt 5")]))
            .expect_err("JobHistoryId is not a query field");
        assert!(refused.contains("'JobHistoryId'"), "{refused}");
        assert!(Query::from_pairs(&pairs(&[("pq.sortField", "JobHistoryId")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.sortField", "OperationStart")])).is_ok());
    }
}
