//! Who may run what: the mode table, overrides, and session grants.
//!
//! | mode | read tools | writes, edits | commands |
//! |---|---|---|---|
//! | chat | run | ask | ask |
//! | do | run | run | ask |
//! | plan, review, research | run | denied | denied |
//!
//! `overrides.auto` acts as `do`; `overrides.dangerous` runs everything. A grant
//! (`remember: "session"`) covers one tool, or for commands one program and first argument
//! of a *simple* command; compound commands always ask.

use opta_protocol::{Mode, TurnOverrides};

use super::tools::ToolKind;

/// What the mode and overrides say about a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Run it; `approvedBy` is `mode` or `dangerous`.
    Allow(&'static str),
    /// Ask the clients (unless a grant covers it).
    Ask,
    /// Refuse it without asking; the reason is what the model sees.
    Deny(String),
}

/// `decidedBy` values only the daemon sets: a client that sent one could pass its own answer
/// off as a grant, the mode or a timeout.
pub const DAEMON_DECIDERS: &[&str] = &[
    "timeout",
    "cancel",
    "interrupted",
    "mode",
    "grant",
    "error",
    "dangerous",
];

/// Who decided, as a metric label: one of [`DAEMON_DECIDERS`], else `client` (a client's
/// own name never becomes a label: it is unbounded and unescaped).
pub fn decider_label(by: &str) -> &'static str {
    DAEMON_DECIDERS
        .iter()
        .find(|reserved| **reserved == by)
        .copied()
        .unwrap_or("client")
}

/// A client's `decidedBy` as recorded (`client` when empty), or why it is refused.
pub fn client_decider(given: &str) -> Result<String, String> {
    let given = given.trim();
    if given.is_empty() {
        return Ok("client".to_owned());
    }
    if DAEMON_DECIDERS
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(given))
    {
        return Err(format!(
            "{given:?} is set by the daemon only; name the client or person that decides \
             (reserved: {})",
            DAEMON_DECIDERS.join(", ")
        ));
    }
    Ok(given.to_owned())
}

/// The policy for a call of `kind` in `mode` with `overrides`.
pub fn policy(mode: Mode, overrides: Option<&TurnOverrides>, kind: ToolKind) -> Policy {
    let dangerous = overrides.and_then(|o| o.dangerous).unwrap_or(false);
    let auto = overrides.and_then(|o| o.auto).unwrap_or(false);
    if kind == ToolKind::Read {
        return Policy::Allow("mode");
    }
    if dangerous {
        return Policy::Allow("dangerous");
    }
    let mode = if auto { Mode::Do } else { mode };
    match (mode, kind) {
        (_, ToolKind::Read) => Policy::Allow("mode"),
        (Mode::Chat, _) => Policy::Ask,
        (Mode::Do, ToolKind::Write) => Policy::Allow("mode"),
        (Mode::Do, ToolKind::Command) => Policy::Ask,
        (Mode::Plan | Mode::Review | Mode::Research, _) => Policy::Deny(format!(
            "denied in {} mode: this mode may only read and search; describe the change \
             instead of making it",
            mode.as_str()
        )),
    }
}

/// The grant that would cover a call: the tool's name, or for commands
/// `run_command:<program> <first argument>`; `None` for a compound command.
pub fn grant_key(tool: &str, kind: ToolKind, command_scope: Option<&str>) -> Option<String> {
    match kind {
        ToolKind::Command => command_scope.map(|scope| format!("{tool}:{scope}")),
        _ => Some(tool.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_table() {
        use ToolKind::*;
        let ask = |m, k| policy(m, None, k);
        assert_eq!(ask(Mode::Chat, Read), Policy::Allow("mode"));
        assert_eq!(ask(Mode::Chat, Write), Policy::Ask);
        assert_eq!(ask(Mode::Chat, Command), Policy::Ask);
        assert_eq!(ask(Mode::Do, Write), Policy::Allow("mode"));
        assert_eq!(ask(Mode::Do, Command), Policy::Ask);
        for m in [Mode::Plan, Mode::Review, Mode::Research] {
            assert_eq!(ask(m, Read), Policy::Allow("mode"));
            assert!(
                matches!(ask(m, Write), Policy::Deny(r) if r.contains(&format!("denied in {} mode", m.as_str())))
            );
            assert!(matches!(ask(m, Command), Policy::Deny(_)));
        }
        let auto = TurnOverrides {
            auto: Some(true),
            ..TurnOverrides::default()
        };
        assert_eq!(
            policy(Mode::Chat, Some(&auto), Write),
            Policy::Allow("mode")
        );
        assert_eq!(policy(Mode::Plan, Some(&auto), Command), Policy::Ask);
        let dangerous = TurnOverrides {
            dangerous: Some(true),
            ..TurnOverrides::default()
        };
        assert_eq!(
            policy(Mode::Plan, Some(&dangerous), Command),
            Policy::Allow("dangerous")
        );
    }

    #[test]
    fn grant_keys() {
        assert_eq!(
            grant_key("write_file", ToolKind::Write, None).as_deref(),
            Some("write_file")
        );
        assert_eq!(
            grant_key("run_command", ToolKind::Command, Some("cargo test")).as_deref(),
            Some("run_command:cargo test")
        );
        assert_eq!(grant_key("run_command", ToolKind::Command, None), None);
    }
}
