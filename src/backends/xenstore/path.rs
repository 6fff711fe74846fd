//! Xenstore path syntax (docs/misc/xenstore.txt): validation, resolution of
//! a domain's relative paths under `/local/domain/<domid>`, parent and leaf
//! names, and the "is a child of" relation that watch matching uses.

use super::wire::{XsError, ABS_PATH_MAX, REL_PATH_MAX};

/// `/local/domain/<domid>`, the base of a domain's relative paths.
pub fn domain_path(domid: u16) -> String {
    format!("/local/domain/{domid}")
}

fn valid_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@')
}

/// Checks an absolute node path: starts with `/`, only alphanumerics and
/// `-/_@`, no empty component (doubled or trailing slash, except `/` itself),
/// at most [`ABS_PATH_MAX`] bytes.
pub fn check_abs(p: &str) -> Result<(), XsError> {
    let b = p.as_bytes();
    if b.first() != Some(&b'/') || b.len() > ABS_PATH_MAX {
        return Err(XsError::Inval);
    }
    if p == "/" {
        return Ok(());
    }
    if b.ends_with(b"/") || p.contains("//") || !b.iter().all(|&c| valid_char(c)) {
        return Err(XsError::Inval);
    }
    Ok(())
}

/// Resolves a path sent by `domid` to its canonical absolute form: absolute
/// paths are checked as they are, relative ones are joined under
/// `/local/domain/<domid>`. `@` names are not node paths (`EINVAL`).
pub fn resolve(domid: u16, p: &str) -> Result<String, XsError> {
    if p.starts_with('/') {
        check_abs(p)?;
        return Ok(p.to_owned());
    }
    if p.is_empty() || p.len() > REL_PATH_MAX || p.starts_with('@') {
        return Err(XsError::Inval);
    }
    let abs = format!("{}/{p}", domain_path(domid));
    check_abs(&abs)?;
    Ok(abs)
}

/// Checks a special watch name such as `@releaseDomain`.
pub fn check_special(p: &str) -> Result<(), XsError> {
    let b = p.as_bytes();
    if b.len() < 2 || b[0] != b'@' || b.len() > REL_PATH_MAX || !b.iter().all(|&c| valid_char(c)) {
        return Err(XsError::Inval);
    }
    Ok(())
}

/// The parent of a canonical absolute path; `None` for `/`.
pub fn parent(p: &str) -> Option<&str> {
    if p == "/" {
        return None;
    }
    match p.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&p[..i]),
        None => None,
    }
}

/// The last component of a canonical absolute path (`""` for `/`).
pub fn leaf(p: &str) -> &str {
    p.rfind('/').map_or(p, |i| &p[i + 1..])
}

/// Joins a canonical parent path and a leaf name.
pub fn join(parent: &str, leaf: &str) -> String {
    if parent == "/" {
        format!("/{leaf}")
    } else {
        format!("{parent}/{leaf}")
    }
}

/// Whether `child` is `parent` or lies below it (every path is below `/`).
pub fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    match child.strip_prefix(parent) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_relative_joins_domain_path() {
        assert_eq!(
            resolve(7, "device/vbd").unwrap(),
            "/local/domain/7/device/vbd"
        );
        assert_eq!(resolve(7, "/vm/x").unwrap(), "/vm/x");
    }

    #[test]
    fn resolve_bad_syntax_is_einval() {
        for p in [
            "", "/a/", "/a//b", "//", "a/", "a//b", "/a b", "/a.b", "@x", "/ä",
        ] {
            assert_eq!(resolve(1, p), Err(XsError::Inval), "{p:?}");
        }
        assert!(resolve(1, "/").is_ok());
        assert!(resolve(1, "/a-b_c@d/9").is_ok());
    }

    #[test]
    fn resolve_length_limits_enforced() {
        let abs = format!("/{}", "a".repeat(ABS_PATH_MAX - 1));
        assert!(resolve(0, &abs).is_ok());
        let too_long = format!("/{}", "a".repeat(ABS_PATH_MAX));
        assert_eq!(resolve(0, &too_long), Err(XsError::Inval));
        assert!(resolve(0, &"r".repeat(REL_PATH_MAX)).is_ok());
        assert_eq!(
            resolve(0, &"r".repeat(REL_PATH_MAX + 1)),
            Err(XsError::Inval)
        );
    }

    #[test]
    fn parent_and_leaf_split_components() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b/c"), Some("/a/b"));
        assert_eq!(leaf("/a/b/c"), "c");
        assert_eq!(leaf("/"), "");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
    }

    #[test]
    fn is_child_prefix_without_slash_is_false() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(is_child("/a", "/"));
        assert!(!is_child("/ab", "/a"));
        assert!(!is_child("/a", "/a/b"));
        assert!(!is_child("@releaseDomain", "/"));
    }

    #[test]
    fn check_special_requires_at_and_name() {
        assert!(check_special("@releaseDomain").is_ok());
        assert_eq!(check_special("@"), Err(XsError::Inval));
        assert_eq!(check_special("/x"), Err(XsError::Inval));
    }
}
