//! Where training activations come from: the [`ActivationSource`] trait, an in-memory
//! source and a reader of activation shards (the format of [`crate::harvest`], see
//! "Activation shards" there).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::harvest::{shard_paths, ACTIVATIONS_TENSOR};
use crate::io::TensorFile;
use crate::rng::Rng;
use crate::{Error, Result};

/// A never-ending stream of shuffled activation batches.
pub trait ActivationSource {
    /// The width of each activation row.
    fn d_in(&self) -> usize;

    /// Replace the contents of `out` with `batch` rows (`batch · d_in` f32 values,
    /// row-major). Sources cycle through their data in epochs, so this never runs dry.
    /// `out`'s capacity is reused: after the first call no allocation is needed.
    fn next_batch(&mut self, batch: usize, out: &mut Vec<f32>) -> Result<()>;
}

/// Activations held in memory (`[n, d_in]` row-major), served in a fresh seeded random
/// order each epoch (a permutation of the rows, so each epoch sees each row once).
#[derive(Debug, Clone)]
pub struct InMemorySource {
    data: Vec<f32>,
    d_in: usize,
    order: Vec<u32>,
    pos: usize,
    rng: Rng,
}

impl InMemorySource {
    /// Wrap `data` (`[n, d_in]` row-major, `n ≥ 1`), shuffled with `seed`.
    pub fn new(data: Vec<f32>, d_in: usize, seed: u64) -> Result<Self> {
        if d_in == 0 || data.is_empty() || !data.len().is_multiple_of(d_in) {
            return Err(Error::Invalid(format!(
                "in-memory activations: {} values do not form rows of d_in = {d_in}",
                data.len()
            )));
        }
        let n = data.len() / d_in;
        let n32 = u32::try_from(n)
            .map_err(|_| Error::Invalid(format!("in-memory activations: {n} rows is too many")))?;
        let mut rng = Rng::with_stream(seed, 0x5055_5243);
        let mut order: Vec<u32> = (0..n32).collect();
        rng.shuffle(&mut order);
        Ok(InMemorySource {
            data,
            d_in,
            order,
            pos: 0,
            rng,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no rows (never true for a constructed source).
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl ActivationSource for InMemorySource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, batch: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        let d = self.d_in;
        for _ in 0..batch {
            if self.pos >= self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.pos = 0;
            }
            let r = self.order.get(self.pos).copied().unwrap_or(0) as usize;
            self.pos += 1;
            let row = self
                .data
                .get(r * d..(r + 1) * d)
                .ok_or_else(|| Error::Invalid("in-memory activations: row out of range".into()))?;
            out.extend_from_slice(row);
        }
        Ok(())
    }
}

/// Activations read from safetensors shards (see the module docs for the layout),
/// shuffled across shards by a shuffle buffer.
///
/// Shards are visited in a seeded random order that is redrawn every epoch; the rows of
/// the shard being read stream into a buffer of `buffer_rows` rows, and each output row is
/// a uniformly random buffer slot, which is then refilled with the next streamed row. A
/// buffer of a few shards' worth of rows mixes tokens from different shards (and hence
/// documents) within a batch. Only the current shard (as f32) and the buffer are in memory.
#[derive(Debug)]
pub struct ShardSource {
    paths: Vec<PathBuf>,
    d_in: usize,
    shard_order: Vec<usize>,
    next_shard: usize,
    cur: Vec<f32>,
    cur_pos: usize,
    buffer: Vec<f32>,
    buffer_rows: usize,
    filled: bool,
    rng: Rng,
}

impl ShardSource {
    /// Open `paths` (at least one), checking every header: the `activations` tensor must be
    /// present, 2-D, of a float dtype, non-empty, and share one `d_in`.
    pub fn new(paths: Vec<PathBuf>, buffer_rows: usize, seed: u64) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::empty("the list of activation shards"));
        }
        let mut d_in = None;
        for p in &paths {
            let f = TensorFile::open(p)?;
            let shape = f.shape(ACTIVATIONS_TENSOR).ok_or_else(|| {
                Error::MissingTensor {
                    name: ACTIVATIONS_TENSOR.into(),
                }
                .in_file(p)
            })?;
            let d = match shape {
                [n, d] if *n > 0 && *d > 0 => *d,
                _ => {
                    return Err(Error::Format {
                        format: "activation shard",
                        msg: format!(
                            "`{ACTIVATIONS_TENSOR}` has shape {shape:?}, expected a non-empty [n, d_in]"
                        ),
                    }
                    .in_file(p))
                }
            };
            match d_in {
                None => d_in = Some(d),
                Some(d0) if d0 != d => {
                    return Err(Error::Shape {
                        name: ACTIVATIONS_TENSOR.into(),
                        expected: vec![shape[0], d0],
                        found: shape.to_vec(),
                    }
                    .in_file(p))
                }
                Some(_) => {}
            }
        }
        let d_in = d_in.unwrap_or(0);
        let mut rng = Rng::with_stream(seed, 0x0053_4841_5244);
        let mut shard_order: Vec<usize> = (0..paths.len()).collect();
        rng.shuffle(&mut shard_order);
        Ok(ShardSource {
            paths,
            d_in,
            shard_order,
            next_shard: 0,
            cur: Vec::new(),
            cur_pos: 0,
            buffer: Vec::new(),
            buffer_rows: buffer_rows.max(1),
            filled: false,
            rng,
        })
    }

    /// The shards of `dir` ([`shard_paths`]).
    pub fn from_dir(dir: impl AsRef<Path>, buffer_rows: usize, seed: u64) -> Result<Self> {
        Self::new(shard_paths(dir.as_ref())?, buffer_rows, seed)
    }

    /// The next streamed row (loading shards as needed), copied into `dst`.
    fn stream_row(&mut self, dst: &mut [f32]) -> Result<()> {
        let d = self.d_in;
        if self.cur_pos * d >= self.cur.len() {
            if self.next_shard >= self.shard_order.len() {
                self.rng.shuffle(&mut self.shard_order);
                self.next_shard = 0;
            }
            let idx = self.shard_order.get(self.next_shard).copied().unwrap_or(0);
            self.next_shard += 1;
            let path = self
                .paths
                .get(idx)
                .ok_or_else(|| Error::Invalid("shard index out of range".into()))?;
            let t = TensorFile::open(path)?.load(ACTIVATIONS_TENSOR, &Device::Cpu)?;
            if t.dims().get(1) != Some(&d) {
                return Err(Error::Shape {
                    name: ACTIVATIONS_TENSOR.into(),
                    expected: vec![t.dims().first().copied().unwrap_or(0), d],
                    found: t.dims().to_vec(),
                }
                .in_file(path));
            }
            self.cur = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            self.cur_pos = 0;
            if self.cur.is_empty() {
                return Err(Error::format("activation shard", "empty shard").in_file(path));
            }
        }
        let src = self
            .cur
            .get(self.cur_pos * d..(self.cur_pos + 1) * d)
            .ok_or_else(|| Error::Invalid("shard row out of range".into()))?;
        dst.copy_from_slice(src);
        self.cur_pos += 1;
        Ok(())
    }
}

impl ActivationSource for ShardSource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_batch(&mut self, batch: usize, out: &mut Vec<f32>) -> Result<()> {
        let d = self.d_in;
        if !self.filled {
            let mut buf = vec![0f32; self.buffer_rows * d];
            for row in buf.chunks_exact_mut(d) {
                self.stream_row(row)?;
            }
            self.buffer = buf;
            self.filled = true;
        }
        out.clear();
        out.resize(batch * d, 0.0);
        let mut buffer = std::mem::take(&mut self.buffer);
        let mut result = Ok(());
        for dst in out.chunks_exact_mut(d) {
            let j = self.rng.below(self.buffer_rows);
            if let Some(slot) = buffer.get_mut(j * d..(j + 1) * d) {
                dst.copy_from_slice(slot);
                if let Err(e) = self.stream_row(slot) {
                    result = Err(e);
                    break;
                }
            }
        }
        self.buffer = buffer;
        result
    }
}
