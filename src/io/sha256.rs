//! SHA-256 (FIPS 180-4) for cache keys and corpus checks: the harvest manifest's model,
//! corpus and shard hashes, and the Austen corpus sums.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// An incremental SHA-256.
#[derive(Clone)]
pub(crate) struct Sha256 {
    state: [u32; 8],
    block: [u8; 64],
    filled: usize,
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            state: H0,
            block: [0; 64],
            filled: 0,
            len: 0,
        }
    }
}

impl Sha256 {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Hash `data` after what came before.
    pub(crate) fn update(&mut self, data: impl AsRef<[u8]>) {
        let mut data = data.as_ref();
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.filled > 0 {
            let take = (64 - self.filled).min(data.len());
            let (head, rest) = data.split_at(take);
            self.block[self.filled..self.filled + take].copy_from_slice(head);
            self.filled += take;
            data = rest;
            if self.filled < 64 {
                return;
            }
            let block = self.block;
            compress_blocks(&mut self.state, &block);
            self.filled = 0;
        }
        let whole = data.len() / 64 * 64;
        let (blocks, rest) = data.split_at(whole);
        compress_blocks(&mut self.state, blocks);
        self.block[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// The 32-byte digest.
    pub(crate) fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut pad = [0u8; 72];
        pad[0] = 0x80;
        let n = if self.filled < 56 {
            56 - self.filled
        } else {
            120 - self.filled
        };
        let len = self.len;
        self.update(&pad[..n]);
        self.update(bits.to_be_bytes());
        self.len = len;
        let mut out = [0u8; 32];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&s.to_be_bytes());
        }
        out
    }

    /// The digest as lowercase hex.
    pub(crate) fn finalize_hex(self) -> String {
        hex(&self.finalize())
    }
}

/// Every whole 64-byte block of `data`, in order: the SHA instructions where the CPU has
/// them (about 8× the scalar rounds here), else [`compress`].
fn compress_blocks(state: &mut [u32; 8], data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_sha_ni() {
        // SAFETY: sha, sse2, ssse3 and sse4.1 are present (checked).
        unsafe { ni::compress_blocks(state, data) };
        return;
    }
    for c in data.chunks_exact(64) {
        let mut b = [0u8; 64];
        b.copy_from_slice(c);
        compress(state, &b);
    }
}

/// Whether this CPU has the SHA extensions and the SSE levels their code uses (checked once).
#[cfg(target_arch = "x86_64")]
fn has_sha_ni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse2")
            && std::is_x86_feature_detected!("ssse3")
            && std::is_x86_feature_detected!("sse4.1")
    })
}

/// The compression function on the SHA extensions: `sha256rnds2` runs two rounds on the
/// state held as (a, b, e, f) and (c, d, g, h); `sha256msg1`/`sha256msg2` extend the
/// message schedule four words at a time.
#[cfg(target_arch = "x86_64")]
mod ni {
    use super::K;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has sha, sse2, ssse3 and sse4.1.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress_blocks(state: &mut [u32; 8], data: &[u8]) {
        // SAFETY: the loads read 16 bytes inside `state` (8 words), `K` (64 words, 4·i + 3
        // < 64) and each 64-byte block; the stores write inside `state`.
        unsafe {
            // Big-endian words: reverse the bytes of each 32-bit lane.
            let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
            let sp = state.as_mut_ptr() as *mut __m128i;
            let dcba = _mm_shuffle_epi32::<0xB1>(_mm_loadu_si128(sp));
            let efgh = _mm_shuffle_epi32::<0x1B>(_mm_loadu_si128(sp.add(1)));
            let mut abef = _mm_alignr_epi8::<8>(dcba, efgh);
            let mut cdgh = _mm_blend_epi16::<0xF0>(efgh, dcba);
            // Four rounds i·4 .. i·4 + 3 on the schedule words `w`.
            let rounds4 = |abef: &mut __m128i, cdgh: &mut __m128i, w: __m128i, i: usize| {
                let kw = _mm_add_epi32(w, _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i));
                *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, kw);
                *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32::<0x0E>(kw));
            };
            // The next four schedule words from the previous sixteen.
            let next = |w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i| {
                let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8::<4>(w3, w2));
                _mm_sha256msg2_epu32(t, w3)
            };
            for block in data.chunks_exact(64) {
                let (abef0, cdgh0) = (abef, cdgh);
                let bp = block.as_ptr() as *const __m128i;
                let mut w = [
                    _mm_shuffle_epi8(_mm_loadu_si128(bp), bswap),
                    _mm_shuffle_epi8(_mm_loadu_si128(bp.add(1)), bswap),
                    _mm_shuffle_epi8(_mm_loadu_si128(bp.add(2)), bswap),
                    _mm_shuffle_epi8(_mm_loadu_si128(bp.add(3)), bswap),
                ];
                for (i, &wi) in w.iter().enumerate() {
                    rounds4(&mut abef, &mut cdgh, wi, i);
                }
                for i in 4..16 {
                    // w holds words 4(i−4) .. 4i − 1, oldest first in ring order.
                    let n = next(w[i % 4], w[(i + 1) % 4], w[(i + 2) % 4], w[(i + 3) % 4]);
                    w[i % 4] = n;
                    rounds4(&mut abef, &mut cdgh, n, i);
                }
                abef = _mm_add_epi32(abef, abef0);
                cdgh = _mm_add_epi32(cdgh, cdgh0);
            }
            let feba = _mm_shuffle_epi32::<0x1B>(abef);
            let dchg = _mm_shuffle_epi32::<0xB1>(cdgh);
            _mm_storeu_si128(sp, _mm_blend_epi16::<0xF0>(feba, dchg));
            _mm_storeu_si128(sp.add(1), _mm_alignr_epi8::<8>(dchg, feba));
        }
    }
}

/// The scalar compression function (FIPS 180-4, 6.2.2): the reference, and the body on
/// CPUs without the SHA extensions.
fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    let mut w = [0u32; 64];
    for (wi, c) in w.iter_mut().zip(block.chunks_exact(4)) {
        *wi = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
    }
    for i in 16..64 {
        let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
        let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16]
            .wrapping_add(s0)
            .wrapping_add(w[i - 7])
            .wrapping_add(s1);
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for (k, wi) in K.iter().zip(w) {
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let ch = (e & f) ^ (!e & g);
        let t1 = h
            .wrapping_add(s1)
            .wrapping_add(ch)
            .wrapping_add(*k)
            .wrapping_add(wi);
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        let t2 = s0.wrapping_add(maj);
        h = g;
        g = f;
        f = e;
        e = d.wrapping_add(t1);
        d = c;
        c = b;
        b = a;
        a = t1.wrapping_add(t2);
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = s.wrapping_add(v);
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn hex_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize_hex()
}

/// Lowercase hex SHA-256 of a file (streamed). Errors name the file.
pub(crate) fn file_hex(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(h.finalize_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            hex_digest(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex_digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex_digest(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex_digest(&million),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    /// The SHA-extension body gives the scalar rounds' state for many blocks at once.
    #[test]
    fn sha_instructions_match_the_scalar_rounds() {
        let data: Vec<u8> = (0..64 * 37u32)
            .map(|i| ((i * 131 + 17) % 251) as u8)
            .collect();
        let mut want = H0;
        for c in data.chunks_exact(64) {
            let mut b = [0u8; 64];
            b.copy_from_slice(c);
            compress(&mut want, &b);
        }
        let mut got = H0;
        compress_blocks(&mut got, &data);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        println!("SHA extensions on this CPU: {}", has_sha_ni());
    }

    #[test]
    fn split_updates_equal_one_update() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for cut in [0, 1, 55, 56, 63, 64, 65, 127, 999] {
            let mut h = Sha256::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            assert_eq!(h.finalize_hex(), hex_digest(&data), "cut at {cut}");
        }
    }
}
