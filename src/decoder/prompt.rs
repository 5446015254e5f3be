//! The plain `System:/User:/Assistant:` prompt layout: used when a GGUF has
//! no chat template (or llama.cpp does not know it), and by the subprocess
//! backend, which hands `llama-completion` a finished prompt.

use super::{ChatMessage, Role};

/// Each message as `Role: content` on its own line(s), then `Assistant:`.
pub fn plain_layout(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        let label = match m.role {
            Role::System => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::Tool => "Tool",
        };
        out.push_str(label);
        out.push_str(": ");
        out.push_str(m.content.trim());
        out.push('\n');
    }
    out.push_str("Assistant:");
    out
}

/// Stop strings that end a turn in the plain layout: the model starting the
/// next speaker's line.
pub fn plain_layout_stops() -> Vec<String> {
    ["\nUser:", "\nSystem:"].map(String::from).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_layout_ends_with_the_assistant_cue() {
        let messages = [
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, " hi \n"),
        ];
        assert_eq!(
            plain_layout(&messages),
            "System: Be brief.\nUser: hi\nAssistant:"
        );
    }
}
