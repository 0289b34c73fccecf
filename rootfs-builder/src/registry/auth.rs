//! The anonymous bearer-token flow: a registry answers 401 with
//! `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`; the client fetches a token
//! from the realm and retries with `Authorization: Bearer <token>`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased: `bearer`, `basic`.
    pub scheme: String,
    /// Parameters, keys lowercased.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// The `realm` parameter.
    pub fn realm(&self) -> Option<&str> {
        self.params.get("realm").map(String::as_str)
    }
    /// The `service` parameter.
    pub fn service(&self) -> Option<&str> {
        self.params.get("service").map(String::as_str)
    }
    /// The `scope` parameter.
    pub fn scope(&self) -> Option<&str> {
        self.params.get("scope").map(String::as_str)
    }
}

/// Parses a challenge (`Scheme k=v, k="quoted, \"escaped\""`). Returns `None` for text that is
/// not a challenge.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// The body of a token endpoint's answer (Docker uses `token`, OAuth2 `access_token`).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

impl TokenResponse {
    pub(crate) fn into_token(self) -> Option<String> {
        self.token.or(self.access_token).filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm(), Some("https://auth.docker.io/token"));
        assert_eq!(c.service(), Some("registry.docker.io"));
        assert_eq!(c.scope(), Some("repository:library/nginx:pull"));
    }

    #[test]
    fn handles_spaces_commas_in_quotes_escapes_and_tokens() {
        let c = parse_challenge(
            r#"bearer  Realm = "https://x/token" , scope="repository:a:pull,push", error=insufficient_scope, note="say \"hi\"""#,
        )
        .unwrap();
        assert_eq!(c.realm(), Some("https://x/token"));
        assert_eq!(c.scope(), Some("repository:a:pull,push"));
        assert_eq!(
            c.params.get("error").map(String::as_str),
            Some("insufficient_scope")
        );
        assert_eq!(
            c.params.get("note").map(String::as_str),
            Some(r#"say "hi""#)
        );
        assert_eq!(c.service(), None);
    }

    #[test]
    fn basic_challenge_and_garbage() {
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.realm(), Some("Registry Realm"));
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("Bearer =x").is_none());
        assert!(parse_challenge("Bearer realm").is_none());
    }

    #[test]
    fn token_response_accepts_both_field_names() {
        let t: TokenResponse = serde_json::from_str(r#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.into_token().as_deref(), Some("abc"));
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(t.into_token().as_deref(), Some("xyz"));
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }
}
