//! One choice's output: its text ([`TextStream`]) and, when the request asked for them,
//! the log-probabilities of the bytes that text is made of, handed out together piece
//! by piece (a streamed chunk carries those of its own bytes).
use blocktrain_protocol::frame::ByteLogprobs;

use super::logprobs::{char_offsets, Scored};
use super::text::TextStream;

/// A choice's output so far.
pub struct Output {
    text: TextStream,
    /// With log-probabilities asked for: one per byte taken (before a stop cut it).
    logprobs: Option<Vec<ByteLogprobs>>,
    /// Characters handed out so far: where the next piece starts in the text.
    chars: usize,
}

/// A piece of a choice's text that no later byte changes, with its bytes' scores.
pub struct Piece {
    /// The text (may be empty).
    pub text: String,
    /// Its bytes' log-probabilities, when asked for.
    pub scored: Option<Scored>,
}

impl Output {
    /// An empty output cut at any of `stops`, keeping log-probabilities when `scored`.
    pub fn new(stops: Vec<Vec<u8>>, scored: bool) -> Self {
        Output {
            text: TextStream::new(stops),
            logprobs: scored.then(Vec::new),
            chars: 0,
        }
    }

    /// Adds one output byte with its log-probabilities; false once a stop sequence has
    /// matched (see [`TextStream::push`]).
    pub fn push(&mut self, byte: u8, logprobs: Option<&ByteLogprobs>) -> bool {
        if self.text.stopped() {
            return false;
        }
        if let (Some(all), Some(lp)) = (&mut self.logprobs, logprobs) {
            all.push(lp.clone());
        }
        self.text.push(byte)
    }

    /// OpenAI's `finish_reason` ([`TextStream::finish_reason`]).
    pub fn finish_reason(&self) -> &'static str {
        self.text.finish_reason()
    }

    /// Text that no later byte can change ([`TextStream::ready`]).
    pub fn ready(&mut self) -> Piece {
        let from = self.text.sent();
        let text = self.text.ready();
        self.piece(from, text)
    }

    /// The rest, at the end of the output ([`TextStream::finish`]).
    pub fn finish(&mut self) -> Piece {
        let from = self.text.sent();
        let text = self.text.finish();
        self.piece(from, text)
    }

    fn piece(&mut self, from: usize, text: String) -> Piece {
        let to = self.text.sent();
        let scored = self.logprobs.as_ref().map(|all| {
            let bytes = self.text.kept()[from..to].to_vec();
            Scored {
                offsets: char_offsets(&bytes, self.chars),
                logprobs: all.get(from..to).unwrap_or_default().to_vec(),
                bytes,
            }
        });
        self.chars += text.chars().count();
        Piece { text, scored }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(v: f32) -> ByteLogprobs {
        ByteLogprobs {
            logprob: v,
            top: Vec::new(),
        }
    }

    /// Pieces while streaming carry exactly their bytes' scores, at their offsets, and
    /// the bytes a stop sequence cut carry none.
    #[test]
    fn pieces_carry_their_own_bytes_scores_and_a_stop_cuts_them() {
        let mut out = Output::new(vec![b"END".to_vec()], true);
        let bytes = "aé ENd xEND more".as_bytes();
        let mut pieces = Vec::new();
        for (i, &b) in bytes.iter().enumerate() {
            let go_on = out.push(b, Some(&lp(-(i as f32))));
            pieces.push(out.ready());
            if !go_on {
                break;
            }
        }
        pieces.push(out.finish());
        let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(text, "aé ENd x");
        assert_eq!(out.finish_reason(), "stop");
        let scored: Vec<&Scored> = pieces.iter().filter_map(|p| p.scored.as_ref()).collect();
        let all_bytes: Vec<u8> = scored.iter().flat_map(|s| s.bytes.clone()).collect();
        assert_eq!(all_bytes, "aé ENd x".as_bytes());
        let values: Vec<f32> = scored
            .iter()
            .flat_map(|s| s.logprobs.iter().map(|l| l.logprob))
            .collect();
        assert_eq!(values, (0..9).map(|i| -(i as f32)).collect::<Vec<_>>());
        let offsets: Vec<usize> = scored.iter().flat_map(|s| s.offsets.clone()).collect();
        assert_eq!(offsets, [0, 1, 1, 2, 3, 4, 5, 6, 7]);
        // Without log-probabilities asked for, pieces carry none.
        let mut plain = Output::new(Vec::new(), false);
        plain.push(b'x', None);
        assert!(plain.finish().scored.is_none());
    }
}
