//! An error and every cause under it, as one line: what a log line or an operator's message
//! says of a failure whose own message is only its kind ("error sending request", "db error").

use std::error::Error;

/// `error`'s message and each of its causes' (`source()`), joined by `": "`; a cause whose text
/// the line already holds (an error that repeats its source's message) is not repeated.
pub fn chain_text(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn causes_are_joined_once_each() {
        let e = Layer(
            "error sending request",
            Some(Box::new(Layer(
                "connection error",
                Some(Box::new(Layer("connection error", None))),
            ))),
        );
        assert_eq!(chain_text(&e), "error sending request: connection error");
        assert_eq!(chain_text(&Layer("alone", None)), "alone");
    }
}
