//! A `[store] url`: what a PostgreSQL URL may be — checked when the configuration is, before
//! any connection — and how it is shown in messages, with any password redacted. Apart from the
//! backend so that the configuration's check needs nothing of the backend, and the backend builds
//! on what the configuration accepted.

/// An example `[store] url`, for messages.
const URL_EXAMPLE: &str = "e.g. url = \"postgres://jobhook@127.0.0.1:5432/jobhook\"";

/// Why a `[store] url` was refused.
///
/// None of them repeats the URL: a text that is not a URL the client library reads may hold a
/// password anywhere (`host=… password=…`, `u:pass/word@host`, a percent-encoded key), where no
/// redaction could be sure to find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a `postgres://` or `postgresql://` URL.
    #[error(
        "[store] url is not a postgres:// URL (key=value connection strings are not read); \
         {URL_EXAMPLE}"
    )]
    NotPostgres,
    /// The URL carries a password.
    #[error(
        "[store] url contains a password; remove it from the URL and give it by reference: \
         password = {{ env = \"JOBHOOK_DB_PASSWORD\" }} or {{ file = \"path\" }}"
    )]
    HasPassword,
    /// The client library does not accept it.
    #[error("[store] url is not a valid PostgreSQL URL: {reason}; {URL_EXAMPLE}")]
    Invalid {
        /// The client library's reason (names an option, never a value).
        reason: String,
    },
    /// A parameter asks for TLS to the server, which this build does not have ([`NEEDS_TLS`]).
    #[error(
        "[store] url sets {parameter}={value}, which needs TLS to the database server, and this \
         jobhook has no TLS to PostgreSQL: remove it (the connection is then plain TCP) and \
         reach the server over a network you trust or through a TLS tunnel (docs/SCALING.md)"
    )]
    NeedsTls {
        /// The parameter.
        parameter: &'static str,
        /// Its value, one of those [`NEEDS_TLS`] lists (never the URL's own text).
        value: &'static str,
    },
    /// The URL names no host (nor `hostaddr`).
    #[error("[store] url names no database server; {URL_EXAMPLE}")]
    NoHost,
    /// The URL names no user.
    #[error(
        "[store] url names no user (the client would log in as the operating system's user \
         running the engine); name the role before the host: {URL_EXAMPLE}"
    )]
    NoUser,
    /// A parameter whose value turns off one of the bounds the engine puts on every wait for
    /// the database ([`UNBOUNDING`]).
    #[error(
        "[store] url sets {parameter}={value}, which {effect}; the engine bounds every wait on \
         the database: remove it (the engine's default then applies) or give {wanted}"
    )]
    Unbounded {
        /// The parameter.
        parameter: &'static str,
        /// Its value, as the number it was read as (never the URL's own text).
        value: i64,
        /// What that value does.
        effect: &'static str,
        /// What to give instead.
        wanted: &'static str,
    },
    /// `target_session_attrs=read-only`: only a standby would be used.
    #[error(
        "[store] url sets target_session_attrs=read-only, which connects only to a server that \
         takes no writes, and the engine writes every event it takes; remove it, or set \
         target_session_attrs=read-write to find the primary among several hosts"
    )]
    ReadOnlySession,
}

/// Query parameters, and their values, that ask for TLS to the server: the engine connects
/// without TLS (`NoTls`), so a URL with one of them can never connect — `require` fails at
/// every connection ("no TLS implementation configured", "server does not support TLS"), and
/// the client library refuses `verify-ca` and `verify-full` as an invalid connection string
/// without saying why. `sslmode=prefer` (the default) and `disable` connect without TLS.
const NEEDS_TLS: [(&str, &[&str]); 3] = [
    ("sslmode", &["require", "verify-ca", "verify-full"]),
    ("sslnegotiation", &["direct"]),
    ("channel_binding", &["require"]),
];

/// Query parameters whose value 0 (or less, for a time) would take away a bound the engine puts
/// on waiting for the database, each with what that value does and what to give instead.
/// libpq reads a time of 0 as "no limit"; the client library reads it as "not set" and, for
/// `keepalives_idle`, then leaves the first probe to the system's default of two hours — an
/// operator who wrote 0 meant neither what libpq nor what this library would do. `keepalives=0`
/// turns the probes off; `keepalives_retries=0` is refused by the system when the connection
/// is made, in words that do not name the parameter.
const UNBOUNDING: [(&str, &str, &str); 6] = [
    (
        "keepalives",
        "turns off the TCP keepalive probes that notice a database host gone from the network",
        "keepalives=1",
    ),
    (
        "keepalives_idle",
        "leaves the first keepalive probe to the system's default (two hours)",
        "a number of seconds of 1 or more",
    ),
    (
        "keepalives_interval",
        "asks for keepalive probes without a time between them",
        "a number of seconds of 1 or more",
    ),
    (
        "keepalives_retries",
        "asks for no keepalive probe before a connection is given up, which the system refuses",
        "a count of 1 or more",
    ),
    (
        "connect_timeout",
        "means no limit on connecting, to libpq (this engine would wait its own default instead)",
        "a number of seconds of 1 or more",
    ),
    (
        "tcp_user_timeout",
        "means no limit on unacknowledged data, to libpq (this engine would use its own default instead)",
        "a number of seconds of 1 or more",
    ),
];

/// The value `url`'s query string gives `key` (the last, if several), percent-decoded, as the
/// client library reads it.
fn url_value(url: &str, key: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| {
            let (name, value) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_encoding::percent_decode_str(name).decode_utf8_lossy() == key).then(|| {
                percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
        .next_back()
}

/// Whether `url`'s query string gives `key`, also percent-encoded (`pass%77ord`), as the
/// client library reads keys.
pub(super) fn url_sets(url: &str, key: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|kv| {
            let name = kv.split('=').next().unwrap_or_default();
            percent_encoding::percent_decode_str(name).decode_utf8_lossy() == key
        })
    })
}

/// Checks a `[store] url`: a `postgres://` or `postgresql://` URL that the client library reads
/// and that does not carry a password (that belongs in `[store] password`, by reference) — as
/// the library reads it, wherever it puts one (user-info, a `password` parameter however
/// encoded) — and that can ever work: it names a host and a user, asks for no TLS (this build
/// has none: [`NEEDS_TLS`]) and for no read-only session. Its configuration, when it does.
pub fn check_url(url: &str) -> Result<postgres::Config, UrlError> {
    if !url
        .split_once("://")
        .is_some_and(|(scheme, _)| matches!(scheme, "postgres" | "postgresql"))
    {
        return Err(UrlError::NotPostgres);
    }
    // Before parsing: a password the client library would take apart (a `&` in it, say) must
    // not come back as the name of an unknown option.
    if url_sets(url, "password") {
        return Err(UrlError::HasPassword);
    }
    // Before parsing too: the client library refuses some of these without naming them.
    for (parameter, values) in NEEDS_TLS {
        if let Some(given) = url_value(url, parameter)
            && let Some(value) = values.iter().find(|v| v.eq_ignore_ascii_case(&given))
        {
            return Err(UrlError::NeedsTls { parameter, value });
        }
    }
    // Read as the client library reads them: a value that is not a number is its to refuse.
    for (parameter, effect, wanted) in UNBOUNDING {
        if let Some(value) = url_value(url, parameter).and_then(|v| v.parse::<i64>().ok())
            && value <= 0
        {
            return Err(UrlError::Unbounded {
                parameter,
                value,
                effect,
                wanted,
            });
        }
    }
    let config = url.parse::<postgres::Config>().map_err(|e| {
        let reason = e.to_string();
        // The one message that quotes the URL's text: the name of a parameter, which a password
        // cut at a `&` or a `?` in it would make.
        let reason = if reason.contains("unknown option") {
            format!(
                "a query parameter is not one the PostgreSQL client knows (known: \
                 {KNOWN_URL_PARAMETERS})"
            )
        } else {
            reason
        };
        UrlError::Invalid { reason }
    })?;
    if config.get_password().is_some() {
        return Err(UrlError::HasPassword);
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(UrlError::NoHost);
    }
    if config.get_user().is_none_or(str::is_empty) {
        return Err(UrlError::NoUser);
    }
    if config.get_target_session_attrs() == postgres::config::TargetSessionAttrs::ReadOnly {
        return Err(UrlError::ReadOnlySession);
    }
    Ok(config)
}

/// The query parameters of a `postgres://` URL the client library reads, for the message about
/// one it does not.
const KNOWN_URL_PARAMETERS: &str = "user, dbname, options, application_name, sslmode, \
    sslnegotiation, host, hostaddr, port, connect_timeout, tcp_user_timeout, keepalives, \
    keepalives_idle, keepalives_interval, keepalives_retries, target_session_attrs, \
    channel_binding, load_balance_hosts";

/// `url` with the password of its user-info and any `password=` query parameter replaced by
/// `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let (prefix, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{prefix}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_passwords_in_them_refused() {
        assert_eq!(
            redact_url("postgres://jobhook:hunter2@db:5432/jobhook"),
            "postgres://jobhook:***@db:5432/jobhook"
        );
        assert_eq!(
            redact_url("postgresql://u@h/d?sslmode=disable&password=hunter2"),
            "postgresql://u@h/d?sslmode=disable&password=***"
        );
        assert_eq!(
            redact_url("postgres://jobhook@127.0.0.1:5432/jobhook"),
            "postgres://jobhook@127.0.0.1:5432/jobhook"
        );
        assert!(check_url("postgres://jobhook@127.0.0.1:5432/jobhook").is_ok());
        for bad in [
            "postgres://jobhook:hunter2@db/jobhook",
            "postgres://jobhook@db/jobhook?password=hunter2",
            // Where a password hides from a reading of the text as written, not from the
            // client library: after a `/` or `?` in the user-info, a percent-encoded key.
            "postgres://u:hun/ter2@127.0.0.1:1/db",
            "postgres://u:hun?ter2@127.0.0.1/db",
            "postgres://u@127.0.0.1/db?pass%77ord=hunter2",
            // A password with a `&` the library would cut into an unknown option's name.
            "postgres://u@127.0.0.1/db?password=hun&ter2=x",
            "postgres://u@127.0.0.1/db?pass%77ord=hun&ter2=x",
        ] {
            let e = check_url(bad).unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(e, UrlError::HasPassword | UrlError::Invalid { .. }),
                "{bad}: {text}"
            );
            assert!(text.contains("[store] url"), "{text}");
            for secret in ["hunter2", "hun", "ter2"] {
                assert!(!text.contains(secret), "{bad}: {text}");
            }
        }
        for bad in [
            "mysql://u:hunter2@h/d",
            "host=127.0.0.1 user=u password=hunter2 dbname=x",
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(
                e.contains("not a postgres:// URL") && !e.contains("hunter2"),
                "{e}"
            );
        }
        // A parameter the library does not know is refused without its name (which may be a
        // piece of a password).
        let e = check_url("postgres://u@h/d?ter2=x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a valid PostgreSQL URL") && !e.contains("ter2"),
            "{e}"
        );
        let e = check_url("postgres://u:hunter2@h:notaport/d")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a valid PostgreSQL URL") && !e.contains("hunter2"),
            "{e}"
        );
    }

    /// A URL that can never connect is refused when the configuration is checked, naming what
    /// to change: TLS this build does not have, no server, no user, a read-only session.
    #[test]
    fn urls_that_can_never_work_are_refused_saying_what_to_change() {
        for (url, said) in [
            (
                "postgres://u@db/jobhook?sslmode=require",
                "sets sslmode=require, which needs TLS",
            ),
            (
                "postgres://u@db/jobhook?sslmode=verify-full",
                "sets sslmode=verify-full, which needs TLS",
            ),
            (
                "postgres://u@db/jobhook?connect_timeout=5&sslmode=VERIFY-CA",
                "sets sslmode=verify-ca, which needs TLS",
            ),
            (
                "postgres://u@db/jobhook?ssl%6dode=require",
                "sets sslmode=require, which needs TLS",
            ),
            (
                "postgres://u@db/jobhook?sslnegotiation=direct",
                "sets sslnegotiation=direct, which needs TLS",
            ),
            (
                "postgres://u@db/jobhook?channel_binding=require",
                "sets channel_binding=require, which needs TLS",
            ),
            ("postgres://", "names no database server"),
            ("postgres:///jobhook", "names no database server"),
            ("postgres://db/jobhook", "names no user"),
            ("postgres://@db/jobhook", "names no user"),
            (
                "postgres://u@db/jobhook?target_session_attrs=read-only",
                "target_session_attrs=read-only",
            ),
            (
                "postgres://u@db/jobhook?keepalives=0",
                "sets keepalives=0, which turns off the TCP keepalive probes",
            ),
            (
                "postgres://u@db/jobhook?keepalives_idle=0",
                "sets keepalives_idle=0, which leaves the first keepalive probe to the system's default",
            ),
            (
                "postgres://u@db/jobhook?keepalives_interval=-1",
                "sets keepalives_interval=-1",
            ),
            (
                "postgres://u@db/jobhook?keepalives_retries=0",
                "sets keepalives_retries=0",
            ),
            (
                "postgres://u@db/jobhook?connect_timeout=0",
                "sets connect_timeout=0, which means no limit on connecting, to libpq",
            ),
            (
                "postgres://u@db/jobhook?tcp_user_timeout=0",
                "sets tcp_user_timeout=0",
            ),
            // Percent-encoded (the key, or the value), and the last of two, as the client
            // library reads them.
            (
                "postgres://u@db/jobhook?keepalives=%30",
                "sets keepalives=0",
            ),
            (
                "postgres://u@db/jobhook?connect_timeout=5&connect%5Ftimeout=0",
                "sets connect_timeout=0",
            ),
        ] {
            let e = check_url(url).unwrap_err().to_string();
            assert!(e.starts_with("[store] url "), "{url}: {e}");
            assert!(e.contains(said), "{url}: {e}");
        }
        let e = check_url("postgres://u@db/jobhook?sslmode=require")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("this jobhook has no TLS to PostgreSQL: remove it"),
            "{e}"
        );
        let e = check_url("postgres://u@db/jobhook?keepalives=0")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("or give keepalives=1"), "{e}");
        for url in [
            "postgres://u@db/jobhook?keepalives=1&keepalives_idle=10&keepalives_interval=2",
            "postgres://u@db/jobhook?keepalives_retries=3&connect_timeout=2&tcp_user_timeout=9",
            "postgres://u@db/jobhook?sslmode=prefer",
            "postgres://u@db/jobhook?sslmode=disable",
            "postgres://u@db:5432,db2:5432/jobhook?target_session_attrs=read-write",
            "postgres://u@%2Frun%2Fpostgresql/jobhook",
            "postgres://u@/jobhook?host=/run/postgresql",
            "postgres://u@/jobhook?hostaddr=127.0.0.1",
        ] {
            assert!(check_url(url).is_ok(), "{url}: {:?}", check_url(url));
        }
    }
}
