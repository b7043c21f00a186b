//! SentencePiece vocabularies (GGUF `tokenizer.ggml.model = "llama"`, e.g. Gemma 3's 262k
//! tokens): the encoder and decoder of llama.cpp's SPM tokenizer, reimplemented.
//!
//! Encoding a text (llama.cpp with `parse_special = true`):
//! 1. **Special tokens first.** Every control, user-defined and unknown token written in the
//!    text is cut out as a whole token: Gemma's `<start_of_turn>` and `<bos>`, but also its
//!    user-defined whitespace runs (`"\n"`, `"  "`, `"\t\t"`) and HTML tags (`<b>`, `<table>`).
//!    Tokens are taken longest first (equal lengths: lower id first): every occurrence of the
//!    longest token, left to right without overlap, then the next longest in the text that is
//!    left, and so on. This is llama.cpp's partition; it is not leftmost-longest matching.
//! 2. **Escaping.** Each remaining stretch of text gets a leading space when the vocabulary
//!    asks for one (`add_space_prefix`) and the stretch starts the text or follows a special
//!    token; then every space becomes `▁` (U+2581).
//! 3. **Merging.** The stretch is split into UTF-8 characters. Repeatedly, of all adjacent
//!    pairs whose concatenation is a vocabulary token, the one whose token has the highest
//!    score is merged (equal scores: the leftmost). A priority queue holds every such pair;
//!    a pair made stale by an earlier merge is recognised by its size and skipped.
//! 4. **Output.** Each final piece is its token. A piece that is no token (a character the
//!    vocabulary lacks) is spelled as the byte tokens `<0xXX>` of its UTF-8 bytes, or as the
//!    unknown token where the vocabulary has no byte tokens.
//!
//! Decoding: normal tokens with `▁` turned back into spaces, byte tokens reassembled into
//! UTF-8 (invalid sequences become U+FFFD), user-defined tokens verbatim, control and unknown
//! tokens verbatim unless special tokens are skipped, unused tokens never (as llama.cpp).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::{Error, Result};

/// The word-boundary marker that stands for a space inside SentencePiece tokens.
const SPACE: char = '\u{2581}';

/// GGUF `tokenizer.ggml.token_type` of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// 1: an ordinary piece of text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<bos>`, `<start_of_turn>`).
    Control,
    /// 4: a user-defined token, matched verbatim in the text (`"\n\n"`, `<table>`).
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: one byte, written `<0xXX>`.
    Byte(u8),
    /// 0 or any other code.
    Undefined,
}

impl TokenKind {
    fn from_code(code: i32, id: usize, piece: &str) -> Result<Self> {
        Ok(match code {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte(parse_byte_piece(piece).ok_or_else(|| {
                Error::format(
                    "gguf",
                    format!(
                        "`tokenizer.ggml.token_type` marks token {id} `{piece}` as a byte, \
                         but it is not written <0xXX>"
                    ),
                )
            })?),
            _ => TokenKind::Undefined,
        })
    }

    /// Control, user-defined and unknown tokens are cut out of the text before merging.
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
        )
    }
}

/// `<0x41>` → 0x41.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A trie over the special tokens' bytes: finds every special token starting at a position.
#[derive(Debug, Clone, Default)]
struct SpecialTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// Children sorted by byte.
    next: Vec<(u8, u32)>,
    /// The token that ends here.
    token: Option<u32>,
}

impl SpecialTrie {
    fn new() -> Self {
        SpecialTrie {
            nodes: vec![TrieNode::default()],
        }
    }

    fn insert(&mut self, piece: &str, id: u32) {
        let mut node = 0usize;
        for &b in piece.as_bytes() {
            node = match self.child(node, b) {
                Some(c) => c,
                None => self.add_child(node, b),
            };
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.token = Some(id);
        }
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let next = &self.nodes.get(node)?.next;
        let i = next.binary_search_by_key(&b, |&(k, _)| k).ok()?;
        next.get(i).map(|&(_, c)| c as usize)
    }

    fn add_child(&mut self, node: usize, b: u8) -> usize {
        let c = self.nodes.len();
        self.nodes.push(TrieNode::default());
        if let Some(n) = self.nodes.get_mut(node) {
            let at = n.next.partition_point(|&(k, _)| k < b);
            n.next.insert(at, (b, c as u32));
        }
        c
    }

    /// Call `f(id, len)` for every special token that starts at `text[start..]`.
    fn matches_at(&self, text: &[u8], start: usize, mut f: impl FnMut(u32, usize)) {
        let mut node = 0usize;
        for (i, &b) in text.iter().enumerate().skip(start) {
            match self.child(node, b) {
                Some(c) => node = c,
                None => return,
            }
            if let Some(id) = self.nodes.get(node).and_then(|n| n.token) {
                f(id, i + 1 - start);
            }
        }
    }
}

/// A stretch of the input after special tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// One symbol of the merge pass: a byte range of the escaped text, linked to its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    /// Bytes; 0 once merged into the symbol on its left.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text: a pair whose symbols changed no longer adds up to it.
    size: usize,
}

impl Eq for Pair {}

impl Ord for Pair {
    /// Higher score first; equal scores: the leftmost pair first.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
            .then_with(|| o.right.cmp(&self.right))
            .then_with(|| o.size.cmp(&self.size))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// A SentencePiece vocabulary and its tokenizer.
#[derive(Debug, Clone)]
pub(crate) struct Spm {
    pieces: Vec<Box<str>>,
    scores: Vec<f32>,
    kinds: Vec<TokenKind>,
    ids: HashMap<Box<str>, u32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    specials: SpecialTrie,
    add_space_prefix: bool,
}

impl Spm {
    /// Build the tokenizer from the GGUF arrays `tokenizer.ggml.tokens`, `.scores` and
    /// `.token_type` (all of one length). An empty token is renamed `[EMPTY_{id}]` (as
    /// llama.cpp does); a duplicate token or a NaN score is an error naming it.
    pub(crate) fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        let n = pieces.len();
        if scores.len() != n || types.len() != n {
            return Err(Error::format(
                "gguf",
                format!(
                    "`tokenizer.ggml.tokens` has {n} entries, `tokenizer.ggml.scores` {} and \
                     `tokenizer.ggml.token_type` {}: they must be equal",
                    scores.len(),
                    types.len()
                ),
            ));
        }
        if u32::try_from(n).is_err() {
            return Err(Error::format(
                "gguf",
                format!("`tokenizer.ggml.tokens` has {n} entries: more than u32 ids can count"),
            ));
        }
        let mut vocab = Spm {
            pieces: Vec::with_capacity(n),
            scores: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            ids: HashMap::with_capacity(n),
            byte_ids: [None; 256],
            unk: None,
            specials: SpecialTrie::new(),
            add_space_prefix,
        };
        for (id, ((piece, score), code)) in pieces.into_iter().zip(scores).zip(types).enumerate() {
            vocab.push(id, piece, score, code)?;
        }
        Ok(vocab)
    }

    fn push(&mut self, id: usize, piece: String, score: f32, code: i32) -> Result<()> {
        let piece = if piece.is_empty() {
            format!("[EMPTY_{id}]")
        } else {
            piece
        };
        if score.is_nan() {
            return Err(Error::format(
                "gguf",
                format!("`tokenizer.ggml.scores[{id}]` (token `{piece}`) is NaN"),
            ));
        }
        let kind = TokenKind::from_code(code, id, &piece)?;
        let id32 = id as u32; // `new` checked that every id fits
        if let Some(first) = self.ids.insert(piece.clone().into_boxed_str(), id32) {
            return Err(Error::format(
                "gguf",
                format!("`tokenizer.ggml.tokens` holds `{piece}` twice: ids {first} and {id}"),
            ));
        }
        match kind {
            TokenKind::Byte(b) => {
                self.byte_ids[b as usize].get_or_insert(id32);
            }
            TokenKind::Unknown => {
                self.unk.get_or_insert(id32);
            }
            _ => {}
        }
        if kind.is_special() {
            self.specials.insert(&piece, id32);
        }
        self.pieces.push(piece.into_boxed_str());
        // -0.0 and 0.0 compare equal, as in llama.cpp's float comparison.
        self.scores.push(score + 0.0);
        self.kinds.push(kind);
        Ok(())
    }

    /// Use `id` for characters that have no token and no byte token (default: the first
    /// token of type unknown).
    pub(crate) fn set_unknown(&mut self, id: Option<u32>) {
        if id.is_some() {
            self.unk = id;
        }
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a token string.
    pub(crate) fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// The string of a token id.
    pub(crate) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| &**p)
    }

    /// The kind of a token id.
    pub(crate) fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Append the ids of `text` to `out` (no BOS / EOS): special tokens written in the text
    /// map to their ids, the rest is merged by score.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut prev_special = true;
        for frag in self.partition(text)? {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    self.encode_text(t, self.add_space_prefix && prev_special, out)?;
                    prev_special = false;
                }
            }
        }
        Ok(())
    }

    /// Cut the special tokens out of `text`, longest token first.
    fn partition<'a>(&self, text: &'a str) -> Result<Vec<Fragment<'a>>> {
        let bytes = text.as_bytes();
        // (length, id, start) of every occurrence of every special token.
        let mut found: Vec<(usize, u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            self.specials
                .matches_at(bytes, start, |id, len| found.push((len, id, start)));
        }
        if found.is_empty() {
            return Ok(if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(text)]
            });
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut taken = vec![false; bytes.len()];
        let mut claims: Vec<(usize, usize, u32)> = Vec::new();
        for (len, id, start) in found {
            let span = start..start + len;
            let free = taken
                .get(span.clone())
                .is_some_and(|s| s.iter().all(|t| !t));
            if free {
                taken[span].iter_mut().for_each(|t| *t = true);
                claims.push((start, len, id));
            }
        }
        claims.sort_unstable();
        let mut frags = Vec::with_capacity(2 * claims.len() + 1);
        let mut at = 0;
        for (start, len, id) in claims {
            if start > at {
                frags.push(Fragment::Text(slice(text, at, start)?));
            }
            frags.push(Fragment::Token(id));
            at = start + len;
        }
        if at < text.len() {
            frags.push(Fragment::Text(slice(text, at, text.len())?));
        }
        Ok(frags)
    }

    /// The SPM merge pass over one stretch of text without special tokens.
    fn encode_text(&self, text: &str, space_prefix: bool, out: &mut Vec<u32>) -> Result<()> {
        let mut s = String::with_capacity(text.len() + text.len() / 4 + 3);
        if space_prefix {
            s.push(SPACE);
        }
        s.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        let mut syms = symbols(&s);
        let mut queue = BinaryHeap::with_capacity(syms.len());
        for i in 1..syms.len() {
            self.push_pair(&s, &syms, i - 1, i, &mut queue);
        }
        while let Some(p) = queue.pop() {
            let (Some(&l), Some(&r)) = (syms.get(p.left), syms.get(p.right)) else {
                continue;
            };
            if l.len == 0 || r.len == 0 || l.len + r.len != p.size {
                continue;
            }
            syms[p.left].len = p.size;
            syms[p.left].next = r.next;
            syms[p.right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(p.left);
            }
            if let Some(prev) = l.prev {
                self.push_pair(&s, &syms, prev, p.left, &mut queue);
            }
            if let Some(next) = r.next {
                self.push_pair(&s, &syms, p.left, next, &mut queue);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let sym = syms[k];
            self.emit(piece_of(&s, sym.start, sym.start + sym.len)?, out)?;
            i = sym.next;
        }
        Ok(())
    }

    /// Queue the merge of symbols `left` and `right` if their concatenation is a token.
    fn push_pair(
        &self,
        s: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Pair>,
    ) {
        let (Some(l), Some(r)) = (syms.get(left), syms.get(right)) else {
            return;
        };
        let Some(text) = s.get(l.start..r.start + r.len) else {
            return;
        };
        if let Some(&id) = self.ids.get(text) {
            let score = self.scores.get(id as usize).copied().unwrap_or(f32::MIN);
            queue.push(Pair {
                score,
                left,
                right,
                size: text.len(),
            });
        }
    }

    /// The token of a final piece, or its bytes.
    fn emit(&self, piece: &str, out: &mut Vec<u32>) -> Result<()> {
        if let Some(&id) = self.ids.get(piece) {
            out.push(id);
            return Ok(());
        }
        for &b in piece.as_bytes() {
            let id = self.byte_ids[b as usize].or(self.unk).ok_or_else(|| {
                Error::format(
                    "tokenizer",
                    format!(
                        "`{piece}` is not in the vocabulary, which has neither the byte \
                             token <0x{b:02X}> nor an unknown token"
                    ),
                )
            })?;
            out.push(id);
        }
        Ok(())
    }

    /// The text of `ids`; control and unknown tokens are dropped when `skip_special`.
    pub(crate) fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes: Vec<u8> = Vec::new();
        let mut first = true;
        for &id in ids {
            let (Some(piece), Some(kind)) = (self.id_to_token(id), self.kind(id)) else {
                return Err(Error::TokenOutOfRange {
                    id: id.into(),
                    vocab: self.len(),
                });
            };
            let start = bytes.len();
            match kind {
                TokenKind::Normal => {
                    for c in piece.chars() {
                        let c = if c == SPACE { ' ' } else { c };
                        let mut buf = [0u8; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
                TokenKind::Byte(b) => bytes.push(b),
                TokenKind::UserDefined => bytes.extend_from_slice(piece.as_bytes()),
                TokenKind::Control | TokenKind::Unknown if !skip_special => {
                    bytes.extend_from_slice(piece.as_bytes())
                }
                _ => {}
            }
            // With a space prefix the encoder added a space the text did not have.
            if first && bytes.len() > start {
                if self.add_space_prefix && bytes.get(start) == Some(&b' ') {
                    bytes.remove(start);
                }
                first = false;
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// One symbol per UTF-8 character of `s`, linked in order.
fn symbols(s: &str) -> Vec<Symbol> {
    let n = s.chars().count();
    s.char_indices()
        .enumerate()
        .map(|(k, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: k.checked_sub(1),
            next: (k + 1 < n).then_some(k + 1),
        })
        .collect()
}

fn slice(text: &str, a: usize, b: usize) -> Result<&str> {
    text.get(a..b).ok_or_else(|| {
        Error::format(
            "tokenizer",
            format!("special-token split at bytes {a}..{b} is not on a character boundary"),
        )
    })
}

fn piece_of(s: &str, a: usize, b: usize) -> Result<&str> {
    slice(s, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary from `(piece, score, type)` rows.
    fn vocab(rows: &[(&str, f32, i32)], add_space_prefix: bool) -> Result<Spm> {
        Spm::new(
            rows.iter().map(|r| r.0.to_string()).collect(),
            rows.iter().map(|r| r.1).collect(),
            rows.iter().map(|r| r.2).collect(),
            add_space_prefix,
        )
    }

    fn pieces(v: &Spm, text: &str) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        v.encode(text, &mut ids)?;
        ids.iter()
            .map(|&i| {
                v.id_to_token(i)
                    .map(str::to_string)
                    .ok_or_else(|| Error::Invalid(format!("id {i} out of the vocabulary")))
            })
            .collect()
    }

    /// Merges go by score, not by position or length, and equal scores merge leftmost.
    ///
    /// "abcd" with ab = -5, bc = -1, cd = -3, abc = -4, bcd = -2:
    /// pairs ab (-5), bc (-1), cd (-3) → bc wins: a | bc | d;
    /// new pairs abc (-4), bcd (-2) → bcd wins: a | bcd; the pair a+bcd is no token. → [a, bcd]
    /// (ab + cd would have been the leftmost-first or shortest-first answer.)
    #[test]
    fn merges_highest_score_first() -> crate::TestResult {
        let v = vocab(
            &[
                ("a", 0.0, 1),
                ("b", 0.0, 1),
                ("c", 0.0, 1),
                ("d", 0.0, 1),
                ("ab", -5.0, 1),
                ("bc", -1.0, 1),
                ("cd", -3.0, 1),
                ("abc", -4.0, 1),
                ("bcd", -2.0, 1),
            ],
            false,
        )?;
        assert_eq!(pieces(&v, "abcd")?, ["a", "bcd"]);
        // Without bcd: after bc, abc (-4) is the only pair → [abc, d].
        let v = vocab(
            &[
                ("a", 0.0, 1),
                ("b", 0.0, 1),
                ("c", 0.0, 1),
                ("d", 0.0, 1),
                ("ab", -5.0, 1),
                ("bc", -1.0, 1),
                ("cd", -3.0, 1),
                ("abc", -4.0, 1),
            ],
            false,
        )?;
        assert_eq!(pieces(&v, "abcd")?, ["abc", "d"]);
        Ok(())
    }

    /// "aaa" with aa = -1: the pairs (0,1) and (1,2) tie; the leftmost merges → [aa, a].
    /// Spaces become ▁, with a ▁ prefix when the vocabulary asks for one.
    #[test]
    fn ties_merge_leftmost_and_spaces_escape() -> crate::TestResult {
        let rows = [
            ("a", 0.0, 1),
            ("aa", -1.0, 1),
            ("\u{2581}", -2.0, 1),
            ("\u{2581}a", -0.5, 1),
        ];
        let v = vocab(&rows, false)?;
        assert_eq!(pieces(&v, "aaa")?, ["aa", "a"]);
        // ▁a (-0.5) beats aa (-1): "a aa" → a | ▁a | a, then no more pairs.
        assert_eq!(pieces(&v, "a aa")?, ["a", "\u{2581}a", "a"]);
        let v = vocab(&rows, true)?;
        assert_eq!(pieces(&v, "aaa")?, ["\u{2581}a", "aa"]);
        assert_eq!(v.decode(&[3, 1], false)?, "aaa");
        Ok(())
    }

    /// Characters without a token are spelled as their UTF-8 bytes; decoding puts them back.
    #[test]
    fn byte_fallback_round_trips() -> crate::TestResult {
        let mut rows: Vec<(String, f32, i32)> = (0..=255u32)
            .map(|b| (format!("<0x{b:02X}>"), 0.0, 6))
            .collect();
        rows.push(("x".into(), 0.0, 1));
        rows.push(("<unk>".into(), 0.0, 2));
        let v = Spm::new(
            rows.iter().map(|r| r.0.clone()).collect(),
            rows.iter().map(|r| r.1).collect(),
            rows.iter().map(|r| r.2).collect(),
            false,
        )?;
        let mut ids = Vec::new();
        v.encode("xé🙂", &mut ids)?;
        // x, then é = C3 A9, 🙂 = F0 9F 99 82 as byte tokens (id = byte value here).
        assert_eq!(ids, [256, 0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82]);
        assert_eq!(v.decode(&ids, true)?, "xé🙂");
        // A lone continuation byte decodes to U+FFFD, not an error.
        assert_eq!(v.decode(&[256, 0x9F], true)?, "x\u{FFFD}");
        // Without byte tokens, the unknown token stands in.
        let v = vocab(&[("<unk>", 0.0, 2), ("x", 0.0, 1)], false)?;
        let mut ids = Vec::new();
        v.encode("xy", &mut ids)?;
        assert_eq!(ids, [1, 0]);
        let v = vocab(&[("x", 0.0, 1)], false)?;
        let e = v.encode("xy", &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("`y`") && e.contains("<0x79>"), "{e}");
        Ok(())
    }

    /// Special tokens are cut out longest first, before merging; control tokens are dropped
    /// by `decode(.., true)`, user-defined ones are text.
    #[test]
    fn special_tokens_are_cut_out_longest_first() -> crate::TestResult {
        let v = vocab(
            &[
                ("<s>", 0.0, 3),
                ("\n", 0.0, 4),
                ("\n\n", 0.0, 4),
                ("a", 0.0, 1),
                ("<", 0.0, 1),
                ("s", 0.0, 1),
                (">", 0.0, 1),
                ("<s", 5.0, 1),
                ("ss", 0.0, 3),
                ("sss", 0.0, 3),
            ],
            false,
        )?;
        let ids = |t: &str| -> crate::Result<Vec<u32>> {
            let mut out = Vec::new();
            v.encode(t, &mut out)?;
            Ok(out)
        };
        assert_eq!(ids("a<s>a")?, [3, 0, 3]);
        assert_eq!(ids("\n\n\n")?, [2, 1]);
        // Longest first, not leftmost-longest: in "sssss" the 3-s token is taken at 0,
        // then "ss" in the rest.
        assert_eq!(ids("sssss")?, [9, 8]);
        // "ssss": sss at 0, then "s" is plain text.
        assert_eq!(ids("ssss")?, [9, 5]);
        assert_eq!(ids("")?, Vec::<u32>::new());
        assert_eq!(v.decode(&ids("a<s>a\n")?, true)?, "aa\n");
        assert_eq!(v.decode(&ids("a<s>a\n")?, false)?, "a<s>a\n");
        assert!(v.decode(&[10], false).is_err());
        Ok(())
    }

    #[test]
    fn bad_vocabularies_are_errors_naming_the_key() {
        let e = Spm::new(vec!["a".into()], vec![0.0, 1.0], vec![1], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.ggml.scores"), "{e}");
        let e = Spm::new(
            vec!["a".into(), "a".into()],
            vec![0.0; 2],
            vec![1; 2],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`a` twice"), "{e}");
        let e = Spm::new(vec!["<0xZZ>".into()], vec![0.0], vec![6], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("<0xZZ>") && e.contains("token_type"), "{e}");
        let e = Spm::new(vec!["a".into()], vec![f32::NAN], vec![1], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("scores[0]"), "{e}");
    }
}
