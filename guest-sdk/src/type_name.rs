//! Short type names for error messages, shared by [`properties`](crate::properties) and
//! [`Response`](crate::Response). A leaf module, so both can use it without depending on each
//! other.

/// `T`'s name without module paths: `i32`, `Duration`, `Vec<String>`.
pub(crate) fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            segment.push(c);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_type_names() {
        assert_eq!(short_type_name::<i32>(), "i32");
        assert_eq!(short_type_name::<std::time::Duration>(), "Duration");
        assert_eq!(short_type_name::<Vec<String>>(), "Vec<String>");
    }
}
