//! Keyfactor's paging and query conventions (`reference/keyfactor.md` §6), as far as handlers
//! use them: `pq.queryString` with `-eq -ne -gt -ge -lt -le -contains` clauses joined by `AND`,
//! `pq.sortField`, `pq.sortAscending` (0 = ascending, 1 = descending), `pq.pageReturned`
//! (1-based, default 1) and `pq.returnLimit` (default 50). Parameter names match without regard
//! to case, with or without the `pq.` prefix, as callers send both.

use std::cmp::Ordering;

use serde_json::Value;

/// Default page size (Keyfactor's documented default).
pub const DEFAULT_RETURN_LIMIT: usize = 50;

/// A query: filter, sort, page.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    clauses: Vec<Clause>,
    sort_field: Option<String>,
    descending: bool,
    page: usize,
    limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct Clause {
    field: String,
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

impl Query {
    /// Reads the paging and query parameters from decoded query pairs; the error is the message
    /// of a 400 answer.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Query, String> {
        let mut query = Query {
            clauses: Vec::new(),
            sort_field: None,
            descending: false,
            page: 1,
            limit: DEFAULT_RETURN_LIMIT,
        };
        for (name, value) in pairs {
            let lower = name.to_ascii_lowercase();
            let key = lower.strip_prefix("pq.").unwrap_or(&lower);
            match key {
                "querystring" => query.clauses = parse_query_string(value)?,
                "sortfield" => query.sort_field = Some(value.clone()),
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
                "returnlimit" => query.limit = positive(value, "ReturnLimit")?,
                _ => {}
            }
        }
        Ok(query)
    }

    /// Filters, sorts and pages `rows`; the error is the message of a 400 answer.
    pub fn apply(&self, rows: &[Value]) -> Result<Vec<Value>, String> {
        for clause in &self.clauses {
            if !rows.is_empty() && !rows.iter().any(|r| field(r, &clause.field).is_some()) {
                return Err(format!("Unknown field '{}' in query string.", clause.field));
            }
        }
        let mut selected: Vec<&Value> = rows
            .iter()
            .filter(|row| self.clauses.iter().all(|c| c.matches(row)))
            .collect();
        let sort_field = self.sort_field.as_deref().unwrap_or("JobHistoryId");
        selected.sort_by(|a, b| {
            let ordering = compare_values(field(a, sort_field), field(b, sort_field));
            if self.descending {
                ordering.reverse()
            } else {
                ordering
            }
        });
        let skip = (self.page - 1).saturating_mul(self.limit);
        Ok(selected
            .into_iter()
            .skip(skip)
            .take(self.limit)
            .cloned()
            .collect())
    }
}

fn positive(value: &str, name: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("The value '{value}' is not valid for {name}.")),
    }
}

/// Parses `Field -op Value [AND Field -op Value ...]`; values may be `"quoted"`.
fn parse_query_string(text: &str) -> Result<Vec<Clause>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    split_and(text)
        .into_iter()
        .map(|clause| {
            let clause = clause.trim();
            let bad = || format!("Invalid query string clause '{clause}'.");
            let (field, rest) = clause.split_once(char::is_whitespace).ok_or_else(bad)?;
            let (op, value) = rest
                .trim_start()
                .split_once(char::is_whitespace)
                .ok_or_else(bad)?;
            let op = match op.to_ascii_lowercase().as_str() {
                "-eq" => Op::Eq,
                "-ne" => Op::Ne,
                "-gt" => Op::Gt,
                "-ge" => Op::Ge,
                "-lt" => Op::Lt,
                "-le" => Op::Le,
                "-contains" => Op::Contains,
                _ => return Err(format!("Unknown operator '{op}' in query string.")),
            };
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Ok(Clause {
                field: field.to_owned(),
                op,
                value: value.to_owned(),
            })
        })
        .collect()
}

/// Splits on ` AND ` (any case) outside double quotes.
fn split_and(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let words: Vec<&str> = text.split(' ').collect();
    for word in words {
        if !quoted && word.eq_ignore_ascii_case("AND") && !current.trim().is_empty() {
            parts.push(std::mem::take(&mut current));
            continue;
        }
        quoted ^= word.matches('"').count() % 2 == 1;
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    parts.push(current);
    parts
}

/// A row's field by name, ignoring case (`JobID` finds `JobId`).
fn field<'a>(row: &'a Value, name: &str) -> Option<&'a Value> {
    row.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
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

impl Clause {
    fn matches(&self, row: &Value) -> bool {
        let Some(actual) = field(row, &self.field) else {
            return false;
        };
        let ordering = match actual {
            Value::Number(n) => match (n.as_f64(), self.value.parse::<f64>()) {
                (Some(a), Ok(b)) => a.partial_cmp(&b),
                _ => None,
            },
            Value::String(s) => Some(s.to_ascii_lowercase().cmp(&self.value.to_ascii_lowercase())),
            Value::Bool(b) => Some(b.to_string().cmp(&self.value.to_ascii_lowercase())),
            Value::Null => Some(if self.value.eq_ignore_ascii_case("null") {
                Ordering::Equal
            } else {
                Ordering::Less
            }),
            _ => None,
        };
        match self.op {
            Op::Contains => actual.as_str().is_some_and(|s| {
                s.to_ascii_lowercase()
                    .contains(&self.value.to_ascii_lowercase())
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
    use crate::data::{Dataset, INVENTORY_JOB_ID};

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
        let rows = Dataset::seeded().job_history;
        let q = |p: &[(&str, &str)]| Query::from_pairs(&pairs(p)).unwrap().apply(&rows).unwrap();

        let by_job = format!("JobID -eq \"{INVENTORY_JOB_ID}\"");
        assert_eq!(
            ids(&q(&[("pq.queryString", &by_job)])),
            [2168, 2169, 2170, 2171]
        );
        let combined = format!("JobId -eq \"{INVENTORY_JOB_ID}\" AND JobHistoryId -gt 2169");
        assert_eq!(ids(&q(&[("pq.queryString", &combined)])), [2170, 2171]);
        assert_eq!(
            ids(&q(&[
                ("queryString", &by_job),
                ("sortField", "JobHistoryId"),
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
    }

    #[test]
    fn bad_queries_are_errors() {
        let rows = Dataset::seeded().job_history;
        assert!(Query::from_pairs(&pairs(&[("pq.returnLimit", "x")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.pageReturned", "0")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.sortAscending", "yes")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", "JobId ~ 1")])).is_err());
        assert!(Query::from_pairs(&pairs(&[("pq.queryString", "JobId")])).is_err());
        let unknown = Query::from_pairs(&pairs(&[("pq.queryString", "Nope -eq 1")])).unwrap();
        assert!(unknown.apply(&rows).is_err());
    }
}
