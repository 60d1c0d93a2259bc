//! Compressed telemetry chunks: the versioned, backend-independent byte format of one series' closed window.
//!
//! A chunk holds the points of one series (one device's metric, or the device's dedupe keys) in
//! one time window, oldest first. It is a Gorilla-style encoding (Pelkonen et al., VLDB 2015):
//! timestamps as delta-of-delta, numbers XOR-compressed against the previous value, with one
//! addition: a window whose numbers are all exact decimals (`21.4`, `40`, `-3.25`, every bit
//! reproduced by `k / 10^d`) stores the integers `k` as deltas instead, which is what sensor
//! readings usually are and what XOR compresses worst.
//!
//! Format v1 (`CHUNK_FORMAT_V1`), all integers big-endian within one bit stream:
//!
//! ```text
//! byte 0      format version (1)
//! byte 1      kind: 0 numbers XOR, 1 numbers decimal, 2 booleans, 3 mixed, 4 dedupe keys
//! byte 2      decimal digits d (kind 1; 0 otherwise)
//! varint      point count n (1 ..= CHUNK_POINTS_MAX)
//! bits        timestamps: the first as 64 bits, then n-1 delta-of-deltas (`put_signed`)
//! bits        values, by kind:
//!               0: first f64 as 64 bits, then Gorilla XOR ('0' same; '10' + bits in the
//!                  previous window; '11' + 6 bits leading zeros + 6 bits length-1 + bits)
//!               1: first integer as 64 bits, then n-1 deltas (`put_signed`); value = k / 10^d
//!               2: one bit per point
//!               3: one bit per point (1 = boolean), then the values as kind 0 (booleans 0/1)
//!               4: u64 sequence numbers: first as 64 bits, then n-1 delta-of-deltas
//! ```
//!
//! `put_signed` writes 0 as `0` and anything else zigzag-encoded behind a unary bucket prefix
//! (`10` + 5 bits, `110` + 9, `1110` + 13, `11110` + 17, `111110` + 25, `111111` + 64); every
//! difference is wrapping, so any `i64`/`u64` sequence round-trips. Decoding never panics and
//! never trusts a length: bad bytes are an error.

use crate::model::MetricValue;

/// The only chunk format this build writes; it reads this one, and refuses others.
pub const CHUNK_FORMAT_V1: u8 = 1;
/// Most points one chunk holds (the decoder refuses larger counts before allocating).
pub const CHUNK_POINTS_MAX: usize = 1 << 22;
/// Most decimal digits the decimal kind tries.
const DECIMAL_DIGITS_MAX: u8 = 9;
/// Exact powers of ten (every one is exactly representable as an f64).
const POW10: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Largest |k| the decimal kind stores (2^53: every integer up to it is an exact f64).
const DECIMAL_INT_MAX: f64 = 9_007_199_254_740_992.0;

const KIND_XOR: u8 = 0;
const KIND_DECIMAL: u8 = 1;
const KIND_BOOL: u8 = 2;
const KIND_MIXED: u8 = 3;
const KIND_KEYS: u8 = 4;

/// A chunk that cannot be decoded (corrupt, truncated or of an unknown format).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt telemetry chunk: {0}")]
pub struct ChunkError(pub String);

fn corrupt(what: &str) -> ChunkError {
    ChunkError(what.to_owned())
}

/// Encodes metric points (timestamps in any order, as given). `points` must not be empty and
/// hold at most [`CHUNK_POINTS_MAX`] points; numbers must be finite (the store checks both).
pub fn encode_points(points: &[(i64, MetricValue)]) -> Vec<u8> {
    debug_assert!(!points.is_empty() && points.len() <= CHUNK_POINTS_MAX);
    let bools = points
        .iter()
        .filter(|(_, v)| matches!(v, MetricValue::Bool(_)))
        .count();
    if bools == points.len() {
        let mut w = header(KIND_BOOL, 0, points.len());
        put_timestamps(&mut w, points.iter().map(|p| p.0));
        for (_, v) in points {
            w.put_bit(matches!(v, MetricValue::Bool(true)));
        }
        return w.finish();
    }
    let numbers = || points.iter().map(|(_, v)| as_f64(*v));
    if bools > 0 {
        let mut w = header(KIND_MIXED, 0, points.len());
        put_timestamps(&mut w, points.iter().map(|p| p.0));
        for (_, v) in points {
            w.put_bit(matches!(v, MetricValue::Bool(_)));
        }
        put_xor(&mut w, numbers());
        return w.finish();
    }
    let mut xor = header(KIND_XOR, 0, points.len());
    put_timestamps(&mut xor, points.iter().map(|p| p.0));
    put_xor(&mut xor, numbers());
    let xor = xor.finish();
    match decimal_ints(numbers()) {
        Some((digits, ints)) => {
            let mut w = header(KIND_DECIMAL, digits, points.len());
            put_timestamps(&mut w, points.iter().map(|p| p.0));
            put_deltas(&mut w, ints.iter().copied(), false);
            let decimal = w.finish();
            if decimal.len() < xor.len() {
                decimal
            } else {
                xor
            }
        }
        None => xor,
    }
}

/// Decodes a chunk written by [`encode_points`].
pub fn decode_points(bytes: &[u8]) -> Result<Vec<(i64, MetricValue)>, ChunkError> {
    let (kind, digits, count, mut r) = read_header(bytes)?;
    let ts = get_timestamps(&mut r, count)?;
    let values: Vec<MetricValue> = match kind {
        KIND_BOOL => (0..count)
            .map(|_| r.bit().map(MetricValue::Bool))
            .collect::<Result<_, _>>()?,
        KIND_MIXED => {
            let is_bool = (0..count).map(|_| r.bit()).collect::<Result<Vec<_>, _>>()?;
            let numbers = get_xor(&mut r, count)?;
            is_bool
                .into_iter()
                .zip(numbers)
                .map(|(b, n)| {
                    if b {
                        MetricValue::Bool(n != 0.0)
                    } else {
                        MetricValue::Number(n)
                    }
                })
                .collect()
        }
        KIND_XOR => get_xor(&mut r, count)?
            .into_iter()
            .map(MetricValue::Number)
            .collect(),
        KIND_DECIMAL => {
            let scale = *POW10
                .get(usize::from(digits))
                .ok_or_else(|| corrupt("decimal digits out of range"))?;
            get_deltas(&mut r, count, false)?
                .into_iter()
                .map(|k| MetricValue::Number(decimal_value(k, scale)))
                .collect()
        }
        _ => return Err(corrupt("not a points chunk")),
    };
    r.finish()?;
    Ok(ts.into_iter().zip(values).collect())
}

/// Encodes dedupe keys `(ts_ms, seq)` (any order, as given); same bounds as [`encode_points`].
pub fn encode_keys(keys: &[(i64, u64)]) -> Vec<u8> {
    debug_assert!(!keys.is_empty() && keys.len() <= CHUNK_POINTS_MAX);
    let mut w = header(KIND_KEYS, 0, keys.len());
    put_timestamps(&mut w, keys.iter().map(|k| k.0));
    put_deltas(&mut w, keys.iter().map(|k| k.1 as i64), true);
    w.finish()
}

/// Decodes a chunk written by [`encode_keys`].
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<(i64, u64)>, ChunkError> {
    let (kind, _, count, mut r) = read_header(bytes)?;
    if kind != KIND_KEYS {
        return Err(corrupt("not a dedupe-key chunk"));
    }
    let ts = get_timestamps(&mut r, count)?;
    let seqs = get_deltas(&mut r, count, true)?;
    r.finish()?;
    Ok(ts
        .into_iter()
        .zip(seqs.into_iter().map(|s| s as u64))
        .collect())
}

fn as_f64(v: MetricValue) -> f64 {
    match v {
        MetricValue::Number(n) => n,
        MetricValue::Bool(b) => f64::from(u8::from(b)),
    }
}

fn decimal_value(k: i64, scale: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    // |k| <= 2^53 when encoded; any k decodes deterministically
    let k = k as f64;
    k / scale
}

/// The fewest decimal digits `d` for which every value is exactly `k / 10^d`, with the `k`s.
fn decimal_ints(values: impl Iterator<Item = f64> + Clone) -> Option<(u8, Vec<i64>)> {
    'digits: for digits in 0..=DECIMAL_DIGITS_MAX {
        let scale = POW10[usize::from(digits)];
        let mut ints = Vec::new();
        for v in values.clone() {
            let k = (v * scale).round();
            if k.is_nan() || k.abs() > DECIMAL_INT_MAX {
                continue 'digits;
            }
            #[allow(clippy::cast_possible_truncation)] // |k| <= 2^53, integral
            let k = k as i64;
            if decimal_value(k, scale).to_bits() != v.to_bits() {
                continue 'digits;
            }
            ints.push(k);
        }
        return Some((digits, ints));
    }
    None
}

fn header(kind: u8, digits: u8, count: usize) -> BitWriter {
    let mut w = BitWriter::default();
    w.bytes.extend([CHUNK_FORMAT_V1, kind, digits]);
    let mut n = count as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            w.bytes.push(byte);
            break;
        }
        w.bytes.push(byte | 0x80);
    }
    w
}

fn read_header(bytes: &[u8]) -> Result<(u8, u8, usize, BitReader<'_>), ChunkError> {
    let [version, kind, digits, rest @ ..] = bytes else {
        return Err(corrupt("truncated header"));
    };
    if *version != CHUNK_FORMAT_V1 {
        return Err(ChunkError(format!("unknown chunk format {version}")));
    }
    let mut count: u64 = 0;
    let mut used = 0;
    loop {
        let byte = *rest.get(used).ok_or_else(|| corrupt("truncated count"))?;
        if used >= 4 {
            return Err(corrupt("count too large"));
        }
        count |= u64::from(byte & 0x7f) << (7 * used);
        used += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let count = usize::try_from(count).map_err(|_| corrupt("count too large"))?;
    if count == 0 || count > CHUNK_POINTS_MAX {
        return Err(corrupt("point count out of range"));
    }
    Ok((*kind, *digits, count, BitReader::new(&rest[used..])))
}

fn put_timestamps(w: &mut BitWriter, ts: impl Iterator<Item = i64>) {
    put_deltas(w, ts, true);
}

fn get_timestamps(r: &mut BitReader<'_>, count: usize) -> Result<Vec<i64>, ChunkError> {
    get_deltas(r, count, true)
}

/// The first value raw, then each delta (`second_order`: each delta-of-delta), wrapping.
fn put_deltas(w: &mut BitWriter, values: impl Iterator<Item = i64>, second_order: bool) {
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, v) in values.enumerate() {
        if i == 0 {
            w.put_bits(v as u64, 64);
        } else {
            let delta = v.wrapping_sub(prev);
            w.put_signed(if second_order {
                delta.wrapping_sub(prev_delta)
            } else {
                delta
            });
            prev_delta = delta;
        }
        prev = v;
    }
}

fn get_deltas(
    r: &mut BitReader<'_>,
    count: usize,
    second_order: bool,
) -> Result<Vec<i64>, ChunkError> {
    let mut out = Vec::with_capacity(count.min(r.bits_left()));
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for i in 0..count {
        let v = if i == 0 {
            r.bits(64)? as i64
        } else {
            let d = r.signed()?;
            let delta = if second_order {
                prev_delta.wrapping_add(d)
            } else {
                d
            };
            prev_delta = delta;
            prev.wrapping_add(delta)
        };
        out.push(v);
        prev = v;
    }
    Ok(out)
}

fn put_xor(w: &mut BitWriter, values: impl Iterator<Item = f64>) {
    let mut prev = 0u64;
    // The previous meaningful-bits window (leading zeros, length); none until the first '11'.
    let mut window: Option<(u32, u32)> = None;
    for (i, v) in values.enumerate() {
        let bits = v.to_bits();
        if i == 0 {
            w.put_bits(bits, 64);
            prev = bits;
            continue;
        }
        let x = bits ^ prev;
        prev = bits;
        if x == 0 {
            w.put_bit(false);
            continue;
        }
        w.put_bit(true);
        let leading = x.leading_zeros().min(63);
        let trailing = x.trailing_zeros();
        if let Some((wl, wlen)) = window {
            if leading >= wl && trailing >= 64 - wl - wlen {
                w.put_bit(false);
                w.put_bits(x >> (64 - wl - wlen), wlen);
                continue;
            }
        }
        let len = 64 - leading - trailing;
        w.put_bit(true);
        w.put_bits(u64::from(leading), 6);
        w.put_bits(u64::from(len - 1), 6);
        w.put_bits(x >> trailing, len);
        window = Some((leading, len));
    }
}

fn get_xor(r: &mut BitReader<'_>, count: usize) -> Result<Vec<f64>, ChunkError> {
    let mut out = Vec::with_capacity(count.min(r.bits_left()));
    let mut prev = 0u64;
    let mut window: Option<(u32, u32)> = None;
    for i in 0..count {
        if i == 0 {
            prev = r.bits(64)?;
        } else if r.bit()? {
            let (leading, len) = if r.bit()? {
                let leading = r.bits(6)? as u32;
                let len = r.bits(6)? as u32 + 1;
                if leading + len > 64 {
                    return Err(corrupt("XOR window out of range"));
                }
                window = Some((leading, len));
                (leading, len)
            } else {
                window.ok_or_else(|| corrupt("XOR window reused before set"))?
            };
            prev ^= r.bits(len)? << (64 - leading - len);
        }
        out.push(f64::from_bits(prev));
    }
    Ok(out)
}

/// Bucket widths of `put_signed` after the unary prefix `1`, `11`, ... (zigzag-encoded).
const SIGNED_BUCKET_BITS: [u32; 6] = [5, 9, 13, 17, 25, 64];

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte of `bytes` (0 = start a new byte).
    used: u32,
}

impl BitWriter {
    fn put_bit(&mut self, bit: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if bit {
            if let Some(last) = self.bytes.last_mut() {
                *last |= 0x80 >> self.used;
            }
        }
        self.used = (self.used + 1) % 8;
    }

    /// The low `n` bits of `v`, most significant first.
    fn put_bits(&mut self, v: u64, n: u32) {
        let mut left = n;
        while left > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let room = 8 - self.used;
            let take = room.min(left);
            // The next `take` bits of `v` (below the `left - take` still to come).
            let chunk = ((v >> (left - take)) & ((1u64 << take) - 1)) as u8;
            if let Some(last) = self.bytes.last_mut() {
                *last |= chunk << (room - take);
            }
            self.used = (self.used + take) % 8;
            left -= take;
        }
    }

    fn put_signed(&mut self, v: i64) {
        if v == 0 {
            self.put_bit(false);
            return;
        }
        let zigzag = ((v << 1) ^ (v >> 63)) as u64;
        for (i, &bits) in SIGNED_BUCKET_BITS.iter().enumerate() {
            let last = i + 1 == SIGNED_BUCKET_BITS.len();
            if last || zigzag < (1u64 << bits) {
                // Unary bucket prefix: a one, i more ones, then a zero (none after the last).
                self.put_bit(true);
                for _ in 0..i {
                    self.put_bit(true);
                }
                if !last {
                    self.put_bit(false);
                }
                self.put_bits(zigzag, bits);
                return;
            }
        }
    }

    fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next bit to read, counted from the start of `bytes`.
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, pos: 0 }
    }

    fn bits_left(&self) -> usize {
        (self.bytes.len() * 8).saturating_sub(self.pos)
    }

    fn bit(&mut self) -> Result<bool, ChunkError> {
        let byte = self
            .bytes
            .get(self.pos / 8)
            .ok_or_else(|| corrupt("truncated bit stream"))?;
        let bit = (byte >> (7 - self.pos % 8)) & 1 == 1;
        self.pos += 1;
        Ok(bit)
    }

    fn bits(&mut self, n: u32) -> Result<u64, ChunkError> {
        debug_assert!(n <= 64);
        if self.bits_left() < n as usize {
            return Err(corrupt("truncated bit stream"));
        }
        let mut v = 0u64;
        let mut left = n;
        while left > 0 {
            let byte = *self
                .bytes
                .get(self.pos / 8)
                .ok_or_else(|| corrupt("truncated bit stream"))?;
            let offset = (self.pos % 8) as u32;
            let avail = 8 - offset;
            let take = avail.min(left);
            let chunk = (u64::from(byte) >> (avail - take)) & ((1u64 << take) - 1);
            v = (v << take) | chunk;
            self.pos += take as usize;
            left -= take;
        }
        Ok(v)
    }

    fn signed(&mut self) -> Result<i64, ChunkError> {
        if !self.bit()? {
            return Ok(0);
        }
        let mut bucket = 0;
        while bucket + 1 < SIGNED_BUCKET_BITS.len() && self.bit()? {
            bucket += 1;
        }
        let zigzag = self.bits(SIGNED_BUCKET_BITS[bucket])?;
        Ok(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64))
    }

    /// Only zero padding may follow the last value.
    fn finish(self) -> Result<(), ChunkError> {
        if self.bits_left() >= 8 {
            return Err(corrupt("trailing bytes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> MetricValue {
        MetricValue::Number(n)
    }

    fn round_trip(points: &[(i64, MetricValue)]) -> Vec<u8> {
        let bytes = encode_points(points);
        let back = decode_points(&bytes).expect("decode");
        assert_eq!(back.len(), points.len());
        for ((t1, v1), (t2, v2)) in points.iter().zip(&back) {
            assert_eq!(t1, t2);
            match (v1, v2) {
                (MetricValue::Number(a), MetricValue::Number(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
                }
                _ => assert_eq!(v1, v2),
            }
        }
        bytes
    }

    /// A tiny deterministic generator (xorshift), so tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn edge_values_round_trip_bit_exact() {
        let values = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            1e-300,
            -1.5e300,
            0.1,
            0.2,
            0.30000000000000004,
            123_456_789.123_456_78,
            9_007_199_254_740_993.0,
        ];
        let points: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as i64 * 1000, num(*v)))
            .collect();
        round_trip(&points);
        for v in values {
            round_trip(&[(0, num(v))]);
            round_trip(&[(0, num(v)), (1, num(v)), (2, num(-v))]);
        }
    }

    #[test]
    fn signed_zero_is_kept_in_a_decimal_looking_window() {
        // -0.0 is not k/10^d for any k: the decimal kind must not be chosen.
        let bytes = round_trip(&[(0, num(1.5)), (1, num(-0.0)), (2, num(2.5))]);
        assert_eq!(bytes[1], KIND_XOR);
        let bytes = round_trip(&[(0, num(1.5)), (1, num(0.0)), (2, num(2.5))]);
        assert_eq!(bytes[1], KIND_DECIMAL);
    }

    #[test]
    fn timestamps_at_the_edges_irregular_and_out_of_order() {
        let ts = [
            0,
            i64::MAX,
            i64::MIN,
            -1,
            1,
            1_767_225_600_000,
            1_767_225_600_001,
            1_767_225_599_000,
            1_767_225_599_000,
            5,
            i64::MAX - 1,
        ];
        let points: Vec<_> = ts.iter().map(|t| (*t, num(1.0))).collect();
        round_trip(&points);
        let mut rng = Rng(42);
        let mut t = 1_767_225_600_000i64;
        let points: Vec<_> = (0..5000)
            .map(|_| {
                t += rng.below(120_000) as i64 - 10_000; // mostly forward, sometimes back
                (t, num(rng.below(1000) as f64 / 7.0))
            })
            .collect();
        round_trip(&points);
    }

    #[test]
    fn booleans_and_mixed_windows_round_trip() {
        let b = |v| MetricValue::Bool(v);
        let bytes = round_trip(&[(0, b(true)), (10, b(false)), (20, b(true))]);
        assert_eq!(bytes[1], KIND_BOOL);
        let bytes = round_trip(&[(0, b(true)), (10, num(1.0)), (20, b(false)), (30, num(0.0))]);
        assert_eq!(bytes[1], KIND_MIXED);
    }

    #[test]
    fn keys_round_trip_including_the_full_u64_range() {
        let keys = [
            (0, 0u64),
            (1, u64::MAX),
            (2, 1),
            (3, i64::MAX as u64),
            (3, i64::MAX as u64 + 1),
            (-5, 42),
        ];
        let bytes = encode_keys(&keys);
        assert_eq!(decode_keys(&bytes).expect("keys"), keys);
        assert!(
            decode_points(&bytes).is_err(),
            "a key chunk is not a points chunk"
        );
        assert!(decode_keys(&encode_points(&[(0, num(1.0))])).is_err());
    }

    #[test]
    fn random_round_trips() {
        let mut rng = Rng(7);
        for case in 0..300 {
            let n = 1 + rng.below(300) as usize;
            let mut t = rng.next() as i64;
            let mut v = (rng.below(10_000) as f64) / 10.0;
            let points: Vec<_> = (0..n)
                .map(|_| {
                    t = t.wrapping_add(match case % 3 {
                        0 => 60_000,
                        1 => 1000 + rng.below(50) as i64 - 25,
                        _ => rng.next() as i64,
                    });
                    let value = match case % 4 {
                        0 => {
                            v += (rng.below(21) as f64 - 10.0) / 10.0;
                            num(v)
                        }
                        1 => num(f64::from_bits(rng.next() >> 2)),
                        2 => MetricValue::Bool(rng.below(2) == 0),
                        _ => num((rng.below(5) as f64) * 0.25),
                    };
                    (t, value)
                })
                .collect();
            round_trip(&points);
            let keys: Vec<_> = points
                .iter()
                .enumerate()
                .map(|(i, (t, _))| (*t, 1_767_225_600_000_000u64 + i as u64))
                .collect();
            assert_eq!(decode_keys(&encode_keys(&keys)).expect("keys"), keys);
        }
    }

    #[test]
    fn regular_decimal_series_take_about_a_byte_per_point() {
        let mut rng = Rng(3);
        let mut v: f64 = 215.0;
        let points: Vec<_> = (0..60)
            .map(|i| {
                v += rng.below(3) as f64 - 1.0;
                (1_767_225_600_000 + i * 60_000, num(v / 10.0))
            })
            .collect();
        let bytes = round_trip(&points);
        assert_eq!(bytes[1], KIND_DECIMAL);
        assert!(bytes.len() < 60 + 20, "{} bytes", bytes.len());
        let keys: Vec<_> = (0..3600u64)
            .map(|i| (1_767_225_600_000 + i as i64 * 1000, 99 + i))
            .collect();
        let bytes = encode_keys(&keys);
        assert!(bytes.len() < 3600 / 4 + 40, "{} bytes", bytes.len());
    }

    #[test]
    fn corrupt_chunks_are_errors_not_panics() {
        let good = encode_points(&[(0, num(1.25)), (60_000, num(1.5)), (120_000, num(7.0))]);
        assert!(decode_points(&[]).is_err());
        assert!(decode_points(&[2, 0, 0, 1]).is_err(), "unknown format");
        assert!(decode_points(&[1, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_points(&[1, 0, 0, 0]).is_err(), "zero points");
        assert!(decode_points(&[1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        for len in 0..good.len() {
            assert!(decode_points(&good[..len]).is_err(), "truncated at {len}");
        }
        let mut longer = good.clone();
        longer.extend([0, 0]);
        assert!(decode_points(&longer).is_err());
        // Every single-bit flip decodes or errs, never panics.
        let keys = encode_keys(&[(0, 1), (1000, 2), (2000, 3)]);
        for bytes in [good, keys] {
            for i in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[i / 8] ^= 0x80 >> (i % 8);
                let _ = decode_points(&b);
                let _ = decode_keys(&b);
            }
        }
    }
}
