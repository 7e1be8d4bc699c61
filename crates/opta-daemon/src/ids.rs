//! Identifiers and secrets the daemon generates.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn random_url_safe(chars: usize) -> String {
    // 6 bits per base64 character; round the byte count up and trim.
    let mut bytes = vec![0u8; chars.div_ceil(4) * 3];
    rand::fill(bytes.as_mut_slice());
    let mut s = URL_SAFE_NO_PAD.encode(&bytes);
    s.truncate(chars);
    s
}

/// `daemon_` + 8 url-safe characters, new at every start.
pub fn new_daemon_id() -> String {
    format!("daemon_{}", random_url_safe(8))
}

/// `turn_` + 16 url-safe characters.
pub fn new_turn_id() -> String {
    format!("turn_{}", random_url_safe(16))
}

/// `perm_` + 16 url-safe characters.
pub fn new_permission_id() -> String {
    format!("perm_{}", random_url_safe(16))
}

/// `proc_` + 16 url-safe characters.
pub fn new_process_id() -> String {
    format!("proc_{}", random_url_safe(16))
}

/// `s_` + 16 url-safe characters; matches the session id pattern.
pub fn new_session_id() -> String {
    format!("s_{}", random_url_safe(16))
}

/// 32 random bytes as hex: the auth token when none is given.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// Now as ISO-8601 UTC with milliseconds (`2026-03-01T10:00:00.000Z`).
pub fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A one-time web sign-in code: 32 url-safe random characters (192 bits).
pub fn new_sign_in_code() -> String {
    random_url_safe(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let d = new_daemon_id();
        assert_eq!(d.len(), "daemon_".len() + 8);
        assert!(opta_protocol::SessionId::parse(&new_session_id()).is_ok());
        assert_eq!(new_token().len(), 64);
        assert_ne!(new_token(), new_token());
        assert!(now_iso().ends_with('Z'));
    }
}
