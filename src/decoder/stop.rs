//! Stop strings over a stream of pieces.
//!
//! A stop string can straddle pieces ("\n\nUs" + "er:"), so text that could
//! still be the start of a stop string is held back until the next piece
//! settles it; text before a complete match is released, the match and
//! everything after it never are.

/// Streams pieces through, holding back possible stop-string prefixes.
#[derive(Debug, Clone, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
}

/// What one [`StopScanner::push`] released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    /// Text safe to hand to the user now.
    pub text: String,
    /// A stop string matched: generation should end.
    pub stopped: bool,
}

impl StopScanner {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds a piece and releases what can no longer become a stop string.
    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        if let Some(at) = self.earliest_match() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_partial_suffix();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// The text still held back, released when generation ends otherwise.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn earliest_match(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s)).min()
    }

    /// Length in bytes of the longest suffix of `held` that is a proper
    /// prefix of some stop string (always on a char boundary).
    fn longest_partial_suffix(&self) -> usize {
        let held = &self.held;
        let mut best = 0;
        for stop in &self.stops {
            let longest = (stop.len() - 1).min(held.len());
            for len in (best + 1..=longest).rev() {
                let start = held.len() - len;
                if held.is_char_boundary(start) && stop.starts_with(&held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut scanner = StopScanner::new(&stops);
        let mut out = String::new();
        for piece in pieces {
            let r = scanner.push(piece);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&scanner.finish());
        (out, false)
    }

    #[test]
    fn a_stop_across_pieces_stops_before_it() {
        assert_eq!(
            run(&["User:"], &["Hello", " there\nUs", "er: more"]),
            ("Hello there\n".into(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(
            run(&["User:"], &["a Us", "ual day"]),
            ("a Usual day".into(), false)
        );
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["END", "\n\n"], &["one\n\ntwo END"]),
            ("one".into(), true)
        );
    }

    #[test]
    fn held_text_is_released_on_char_boundaries() {
        let stops = vec!["éx".to_string()];
        let mut scanner = StopScanner::new(&stops);
        let r = scanner.push("café");
        assert_eq!(r.text, "caf");
        assert_eq!(scanner.finish(), "é");
    }

    #[test]
    fn no_stops_release_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".into(), false));
    }
}
