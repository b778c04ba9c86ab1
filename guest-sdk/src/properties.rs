//! Per-handler configuration set by the operator: the old web.config `<property>` elements or
//! manifest `Options`, as strings, exactly as Keyfactor passes them.
//!
//! Values set to the empty string (or only blanks) count as *not set*: a web.config line such as
//! `<property name="MailFrom" value="" />` means "use the default" to a Keyfactor administrator.
//! Error messages name the property, so a handler can return them as its failure reason and the
//! operator knows what to fix.

use std::str::FromStr;

use crate::type_name::short_type_name;
use crate::{Error, Result, backend};

/// The longest property value quoted in an error message; longer values are cut, so a
/// misplaced secret or a huge value does not end up whole in a recorded failure reason.
const MAX_QUOTED_VALUE: usize = 64;

/// The value of property `name` as the operator set it (case-sensitive name), or `None`.
pub fn get(name: &str) -> Option<String> {
    backend::property_get(name)
}

/// The value of property `name`, or an error `property 'NAME' is not set` when it is absent or
/// blank.
pub fn require(name: &str) -> Result<String> {
    match get(name) {
        Some(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(Error::new(format!("property '{name}' is not set"))),
    }
}

/// The required property `name`, trimmed and parsed as `T`.
///
/// The error names the property, the value and the expected type, e.g.
/// `property 'RetryThreshold' has value 'abc', which is not a valid i32 (invalid digit found in string)`.
pub fn parse<T>(name: &str) -> Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let value = require(name)?;
    parse_value(name, &value)
}

/// Like [`parse`], but a property that is absent or blank gives `default`; a value that is set
/// but does not parse is still an error (a typo should not silently become the default).
pub fn parse_or<T>(name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match get(name) {
        Some(value) if !value.trim().is_empty() => parse_value(name, &value),
        _ => Ok(default),
    }
}

/// The required property `name` as a comma-separated list: items trimmed, blank items dropped
/// (`"a@x, b@x,"` gives two). An error when the property is absent or lists nothing.
pub fn list(name: &str) -> Result<Vec<String>> {
    let value = require(name)?;
    let items = split_list(&value);
    if items.is_empty() {
        return Err(Error::new(format!("property '{name}' lists no values")));
    }
    Ok(items)
}

/// The names of all properties set for this handler, sorted.
pub fn names() -> Vec<String> {
    backend::property_names()
}

/// Splits a comma-separated value, trimming items and dropping blank ones.
pub(crate) fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn parse_value<T>(name: &str, value: &str) -> Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    value.trim().parse::<T>().map_err(|e| {
        Error::new(format!(
            "property '{name}' has value '{}', which is not a valid {} ({e})",
            quote(value),
            short_type_name::<T>()
        ))
    })
}

/// `value` cut to [`MAX_QUOTED_VALUE`] characters, with `…` when cut.
fn quote(value: &str) -> String {
    let mut chars = value.chars();
    let mut out: String = chars.by_ref().take(MAX_QUOTED_VALUE).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::testing::MockHost;

    #[test]
    fn get_and_require() {
        let _host = MockHost::new()
            .property("A", "x")
            .property("Blank", "  ")
            .install();
        assert_eq!(get("A").as_deref(), Some("x"));
        assert_eq!(get("a"), None, "names are case-sensitive");
        assert_eq!(require("A"), Ok("x".to_string()));
        assert_eq!(
            require("Missing").unwrap_err().to_string(),
            "property 'Missing' is not set"
        );
        assert_eq!(
            require("Blank").unwrap_err().to_string(),
            "property 'Blank' is not set"
        );
        assert_eq!(names(), vec!["A".to_string(), "Blank".to_string()]);
    }

    #[test]
    fn parse_names_property_value_and_type() {
        let _host = MockHost::new()
            .property("RetryThreshold", "abc")
            .property("Port", " 587 ")
            .install();
        let err = parse::<i32>("RetryThreshold").unwrap_err().to_string();
        assert_eq!(
            err,
            "property 'RetryThreshold' has value 'abc', which is not a valid i32 (invalid digit found in string)"
        );
        assert_eq!(parse::<u16>("Port"), Ok(587));
        assert_eq!(
            parse::<u16>("Nope").unwrap_err().to_string(),
            "property 'Nope' is not set"
        );
    }

    #[test]
    fn parse_or_defaults_only_when_absent() {
        let _host = MockHost::new()
            .property("Limit", "12")
            .property("Bad", "twelve")
            .property("Empty", "")
            .install();
        assert_eq!(parse_or("Limit", 5u32), Ok(12));
        assert_eq!(parse_or("Missing", 5u32), Ok(5));
        assert_eq!(parse_or("Empty", 5u32), Ok(5));
        let err = parse_or("Bad", 5u32).unwrap_err().to_string();
        assert!(
            err.contains("'Bad'") && err.contains("'twelve'") && err.contains("u32"),
            "{err}"
        );
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let long = "x".repeat(500);
        let _host = MockHost::new().property("Long", &long).install();
        let err = parse::<i32>("Long").unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(err.contains('…'));
    }

    #[test]
    fn list_trims_and_rejects_empty() {
        let _host = MockHost::new()
            .property("To", " a@example.com, ,b@example.com ,")
            .property("Commas", " , ,")
            .install();
        assert_eq!(
            list("To"),
            Ok(vec![
                "a@example.com".to_string(),
                "b@example.com".to_string()
            ])
        );
        assert_eq!(
            list("Commas").unwrap_err().to_string(),
            "property 'Commas' lists no values"
        );
        assert_eq!(
            list("Missing").unwrap_err().to_string(),
            "property 'Missing' is not set"
        );
    }

    #[test]
    fn without_a_mock_host_nothing_is_set() {
        assert_eq!(get("Anything"), None);
        assert!(names().is_empty());
    }
}
