//! One choice's output bytes turned into text as they arrive: cut before the first stop
//! sequence, and handed out only when no later byte can change it.
//!
//! Two things hold text back while streaming: a tail that could be the start of a stop
//! sequence (if the stop then completes, that tail is never sent), and a multi-byte UTF-8
//! character not complete yet (sent whole once it is, so a streamed char is never split
//! into U+FFFD). Bytes that can never be valid UTF-8 become U+FFFD, exactly as
//! `String::from_utf8_lossy` would turn the whole output: the concatenated pieces equal
//! the lossy text of the cut output (tested).
pub struct TextStream {
    stops: Vec<Vec<u8>>,
    kept: Vec<u8>,
    stopped: bool,
    /// Bytes of `kept` already handed out as text.
    sent: usize,
}

impl TextStream {
    /// An empty output cut at any of `stops` (non-empty byte strings).
    pub fn new(stops: Vec<Vec<u8>>) -> Self {
        TextStream {
            stops,
            kept: Vec::new(),
            stopped: false,
            sent: 0,
        }
    }

    /// Adds one output byte. Returns false once a stop sequence has matched: the output
    /// is then cut before it and takes nothing more.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.stopped {
            return false;
        }
        self.kept.push(byte);
        // Checked at every byte, so the stop that ends first wins; among stops ending
        // here, the longest (it starts first).
        let matched = self
            .stops
            .iter()
            .filter(|s| self.kept.ends_with(s))
            .map(Vec::len)
            .max();
        if let Some(len) = matched {
            self.kept.truncate(self.kept.len() - len);
            self.stopped = true;
        }
        !self.stopped
    }

    /// OpenAI's `finish_reason`: `stop` when a stop sequence ended the output, else
    /// `length` (the output ran to `max_tokens`).
    pub fn finish_reason(&self) -> &'static str {
        if self.stopped {
            "stop"
        } else {
            "length"
        }
    }

    /// Whether a stop sequence has matched (the output takes no more bytes).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The output so far, cut before a matched stop sequence.
    pub fn kept(&self) -> &[u8] {
        &self.kept
    }

    /// Bytes of [`Self::kept`] already handed out as text (by `ready` and `finish`).
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Text that no later byte can change (may be empty).
    pub fn ready(&mut self) -> String {
        let end = self.kept.len() - self.held_for_stop();
        let (text, used) = decode_complete(&self.kept[self.sent..end]);
        self.sent += used;
        text
    }

    /// The rest of the text, at the end of the output.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.kept[self.sent..]).into_owned();
        self.sent = self.kept.len();
        text
    }

    /// The longest tail of the output that is a proper prefix of a stop sequence.
    fn held_for_stop(&self) -> usize {
        if self.stopped {
            return 0;
        }
        self.stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().find(|&k| self.kept.ends_with(&s[..k])))
            .max()
            .unwrap_or(0)
    }
}

/// Decodes `bytes` up to an incomplete character at their end: returns the text and the
/// bytes used. Invalid sequences become U+FFFD (one per maximal invalid part, as
/// `from_utf8_lossy` does).
fn decode_complete(bytes: &[u8]) -> (String, usize) {
    let mut text = String::new();
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(s) => {
                text.push_str(s);
                return (text, bytes.len());
            }
            Err(e) => {
                let valid = at + e.valid_up_to();
                text.push_str(&String::from_utf8_lossy(&bytes[at..valid]));
                match e.error_len() {
                    Some(bad) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        at = valid + bad;
                    }
                    None => return (text, valid), // incomplete: wait for more bytes
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Pushes bytes one at a time, collecting `ready` after each, then `finish`.
    fn streamed(stops: &[&[u8]], bytes: &[u8]) -> (Vec<String>, TextStream) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_vec()).collect());
        let mut pieces = Vec::new();
        for &b in bytes {
            let go_on = t.push(b);
            pieces.push(t.ready());
            if !go_on {
                break;
            }
        }
        pieces.push(t.finish());
        (pieces, t)
    }

    #[test]
    fn a_multibyte_char_is_never_split() {
        let (pieces, t) = streamed(&[], "é€😀".as_bytes());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        let nonempty: Vec<&String> = pieces.iter().filter(|p| !p.is_empty()).collect();
        assert_eq!(nonempty, ["é", "€", "😀"]);
        assert_eq!(t.finish_reason(), "length");
    }

    #[test]
    fn output_is_cut_before_the_first_stop_and_its_prefix_is_never_sent() {
        let (pieces, t) = streamed(&[b"\nUser:", b"END"], b"hello\nUsed\nUser: more");
        assert_eq!(pieces.concat(), "hello\nUsed");
        assert_eq!(t.finish_reason(), "stop");
        // The stop that completes first wins, even when a longer one started earlier.
        let (pieces, _) = streamed(&[b"abcd", b"c"], b"xabcd");
        assert_eq!(pieces.concat(), "xab");
        // A held tail that turns out not to be a stop is sent after all.
        let (pieces, t) = streamed(&[b"END"], b"an ENtry");
        assert_eq!(pieces.concat(), "an ENtry");
        assert_eq!(t.finish_reason(), "length");
    }

    #[test]
    fn streamed_pieces_equal_the_lossy_text_of_the_cut_output() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let alphabet: Vec<u8> = "aé€😀\n"
            .bytes()
            .chain([0x80, 0xC3, 0xE2, 0xF0, 0xFF])
            .collect();
        for _ in 0..2000 {
            let len = rng.random_range(0..24);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let stop: &[u8] = if rng.random_bool(0.5) {
                b"\xC3a"
            } else {
                b"a\n"
            };
            let (pieces, _) = streamed(&[stop], &bytes);
            let cut = bytes
                .windows(stop.len())
                .position(|w| w == stop)
                .map_or(&bytes[..], |i| &bytes[..i]);
            assert_eq!(
                pieces.concat(),
                String::from_utf8_lossy(cut),
                "{bytes:?} stop {stop:?}"
            );
        }
    }
}
