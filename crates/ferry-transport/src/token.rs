//! Bearer tokens for the registry and the migration listener.
//!
//! A token is the only thing between a network client and a VM's memory, so
//! it is checked once, where it enters (when the flags are read, before any
//! network I/O), and then carried as a [`Token`]: a value that cannot be
//! made short or empty, compares in constant time, and never shows in a
//! `Debug` print or a log line.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// The shortest token accepted: 16 characters (64 bits of hex, the least
/// `openssl rand -hex 16` gives is 32 characters).
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token is refused. The message says how to make a good one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Empty (an empty `--token` or token file).
    #[error(
        "the token is empty; use at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 16`)"
    )]
    Empty,
    /// Too short to resist guessing.
    #[error(
        "the token is {0} characters; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 16`)"
    )]
    TooShort(usize),
    /// Cannot travel in an `Authorization` header or a JSON hello unchanged.
    #[error("the token holds spaces, control or non-ASCII characters; use printable ASCII (e.g. `openssl rand -hex 16`)")]
    BadCharacters,
}

/// A checked bearer token: at least [`MIN_TOKEN_LEN`] printable ASCII
/// characters. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Token(String);

impl Token {
    /// Checks `token` (surrounding whitespace is not trimmed here: a token
    /// file's reader trims).
    ///
    /// # Errors
    /// [`TokenError`], saying what is wrong and how to make a good one.
    pub fn new(token: impl Into<String>) -> Result<Token, TokenError> {
        let token = token.into();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadCharacters);
        }
        let n = token.chars().count();
        if n < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort(n));
        }
        Ok(Token(token))
    }

    /// The token itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token, in time that depends only on the
    /// lengths (never on where the first difference is).
    pub fn matches(&self, given: &[u8]) -> bool {
        given.ct_eq(self.0.as_bytes()).into()
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>` (the
    /// scheme in any case, the token compared in constant time): the one
    /// check every ferry server (registry, manager, boot service) makes.
    pub fn authorizes(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let Some(scheme) = value.get(..7) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        self.matches(value[7..].trim_ascii())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl TryFrom<String> for Token {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Token, TokenError> {
        Token::new(s)
    }
}

impl From<Token> for String {
    fn from(t: Token) -> String {
        t.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_empty_and_odd_tokens_are_refused() {
        assert_eq!(Token::new(""), Err(TokenError::Empty));
        assert_eq!(Token::new("abc"), Err(TokenError::TooShort(3)));
        assert_eq!(Token::new("a".repeat(15)), Err(TokenError::TooShort(15)));
        assert_eq!(
            Token::new("a b c d e f g h i j"),
            Err(TokenError::BadCharacters)
        );
        assert_eq!(Token::new("ä".repeat(20)), Err(TokenError::BadCharacters));
        assert_eq!(
            TokenError::TooShort(3).to_string(),
            "the token is 3 characters; use at least 16 (e.g. `openssl rand -hex 16`)"
        );
        let t = Token::new("0123456789abcdef").unwrap();
        assert_eq!(t.expose(), "0123456789abcdef");
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b""));
    }

    #[test]
    fn a_token_never_shows_in_debug_and_is_checked_when_read_back() {
        let t = Token::new("secret-secret-secret").unwrap();
        assert!(!format!("{t:?}").contains("secret"));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Token>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Token>("\"short\"").is_err());
    }
}
