//! PyTorch `.pt`/`.pth` state dicts, read by a restricted pickle machine of our own.
//!
//! Two layouts are understood (see `torch/serialization.py`, `_save` and `_legacy_save`):
//!
//! * **zip** (torch ≥ 1.6): a zip archive holding `<prefix>/data.pkl` (the pickled
//!   state dict), one entry `<prefix>/data/<key>` per storage and optionally
//!   `<prefix>/byteorder` (`little` or `big`). Entries are normally stored
//!   uncompressed; deflated entries are decompressed on load.
//! * **legacy** (torch < 1.6): five pickles in a row (magic number, protocol version,
//!   `sys_info`, the object, the sorted list of storage keys), then for every key an
//!   8-byte element count followed by the raw storage bytes.
//!
//! Nothing is ever imported or called. `GLOBAL`/`STACK_GLOBAL` accept only the
//! names a state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `_rebuild_tensor`, `_rebuild_parameter`, `_rebuild_parameter_with_state`, and the
//! `torch.*Storage` types); any other global (`os.system`, `builtins.eval`, …) is an
//! error that names it. `REDUCE` on an allowed global is interpreted structurally:
//! `_rebuild_tensor_v2(storage, offset, size, stride, …)` becomes a [`TensorInfo`].
//!
//! Every declared size is checked (with checked arithmetic) against the storage
//! and the file length when the file is opened, before anything is allocated.
//! [`PthFile::load`] reads one tensor's bytes with positioned reads straight into the
//! buffer that becomes the candle tensor: one copy, no mapping of the whole file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::{Error, Result};

const FMT: &str = "pickle";

/// Deepest nesting of lists, tuples and dicts accepted in a pickle.
const MAX_DEPTH: u32 = 64;
/// Upper bound on the work done copying memoized objects (`BINGET`, `DUP`), in
/// nodes + bytes: at most this, and at most `2^20 + 64 ×` the pickle's length, so a
/// few hundred bytes of `DUP`/`TUPLE2` cannot build (and then print) gigabytes.
/// `torch.save` pickles only re-use small objects (globals, strings).
const MEMO_BUDGET: u64 = 1 << 28;
/// Magic number of the legacy format (`torch.serialization.MAGIC_NUMBER`).
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

fn err(msg: impl Into<String>) -> Error {
    Error::format(FMT, msg)
}

/// Element type of a stored tensor, named after its torch storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PtDtype {
    /// `torch.FloatStorage` (float32).
    F32,
    /// `torch.HalfStorage` (float16).
    F16,
    /// `torch.BFloat16Storage` (bfloat16).
    BF16,
    /// `torch.DoubleStorage` (float64); loaded narrowed to f32.
    F64,
    /// `torch.LongStorage` (int64).
    I64,
    /// `torch.IntStorage` (int32).
    I32,
    /// `torch.ShortStorage` (int16).
    I16,
    /// `torch.CharStorage` (int8); cannot be loaded (candle has no i8).
    I8,
    /// `torch.ByteStorage` (uint8).
    U8,
    /// `torch.BoolStorage` (bool, one byte); loaded as u8.
    Bool,
}

impl PtDtype {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => PtDtype::F32,
            "HalfStorage" => PtDtype::F16,
            "BFloat16Storage" => PtDtype::BF16,
            "DoubleStorage" => PtDtype::F64,
            "LongStorage" => PtDtype::I64,
            "IntStorage" => PtDtype::I32,
            "ShortStorage" => PtDtype::I16,
            "CharStorage" => PtDtype::I8,
            "ByteStorage" => PtDtype::U8,
            "BoolStorage" => PtDtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            PtDtype::F64 | PtDtype::I64 => 8,
            PtDtype::F32 | PtDtype::I32 => 4,
            PtDtype::F16 | PtDtype::BF16 | PtDtype::I16 => 2,
            PtDtype::I8 | PtDtype::U8 | PtDtype::Bool => 1,
        }
    }

    /// The torch dtype name, e.g. `float32`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PtDtype::F32 => "float32",
            PtDtype::F16 => "float16",
            PtDtype::BF16 => "bfloat16",
            PtDtype::F64 => "float64",
            PtDtype::I64 => "int64",
            PtDtype::I32 => "int32",
            PtDtype::I16 => "int16",
            PtDtype::I8 => "int8",
            PtDtype::U8 => "uint8",
            PtDtype::Bool => "bool",
        }
    }

    /// The dtype [`PthFile::load`] returns for this stored dtype, if it can load it.
    pub fn loaded_dtype(&self) -> Option<DType> {
        Some(match self {
            PtDtype::F32 | PtDtype::F64 => DType::F32,
            PtDtype::F16 => DType::F16,
            PtDtype::BF16 => DType::BF16,
            PtDtype::I64 => DType::I64,
            PtDtype::I32 => DType::I32,
            PtDtype::I16 => DType::I16,
            PtDtype::U8 | PtDtype::Bool => DType::U8,
            PtDtype::I8 => return None,
        })
    }
}

impl std::fmt::Display for PtDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and how one tensor of a state dict is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: PtDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stride of each dimension, in elements.
    pub stride: Vec<usize>,
    /// Offset of the first element in its storage, in elements.
    pub offset: usize,
    /// The storage's key (the name of its entry under `data/` in the zip form).
    pub storage: String,
}

impl TensorInfo {
    /// Number of elements; `None` when the shape overflows (see `io::checked_numel`).
    pub fn numel(&self) -> Option<usize> {
        super::checked_numel(&self.shape)
    }
}

/// A non-tensor entry of a state dict (e.g. a Python int or float).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Scalar {
    /// A Python `bool`.
    Bool(bool),
    /// A Python `int` that fits in 64 bits.
    Int(i64),
    /// A Python `float`.
    Float(f64),
    /// A Python `str`.
    Str(String),
}

// ---------------------------------------------------------------------------
// The pickle machine.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(PtDtype),
}

#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    dtype: PtDtype,
    key: String,
    numel: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits: its little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>, u32),
    Tuple(Vec<Value>, u32),
    Dict(Vec<(Value, Value)>, u32),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorInfo),
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::List(_, d) | Value::Tuple(_, d) | Value::Dict(_, d) => *d,
            _ => 0,
        }
    }

    /// Nodes + bytes, for the memo budget.
    fn cost(&self) -> u64 {
        1 + match self {
            Value::Str(s) => s.len() as u64,
            Value::Bytes(b) | Value::BigInt(b) => b.len() as u64,
            Value::List(v, _) | Value::Tuple(v, _) => v.iter().map(Value::cost).sum(),
            Value::Dict(v, _) => v.iter().map(|(k, v)| k.cost() + v.cost()).sum(),
            Value::Storage(s) => s.key.len() as u64,
            Value::Tensor(t) => (t.shape.len() + t.storage.len()) as u64,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(..) => "list",
            Value::Tuple(..) => "tuple",
            Value::Dict(..) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

fn child_depth(items: &[Value]) -> Result<u32> {
    let d = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    if d > MAX_DEPTH {
        return Err(err(format!("objects nested deeper than {MAX_DEPTH}")));
    }
    Ok(d)
}

/// A reader that counts the bytes it has consumed.
struct Src<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Src<R> {
    fn new(r: R) -> Self {
        Src { r, pos: 0 }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                err("truncated pickle (unexpected end of data)")
            } else {
                err(format!("read error: {e}"))
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// `n` bytes; memory grows only with the data actually present.
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        (&mut self.r)
            .take(n)
            .read_to_end(&mut v)
            .map_err(|e| err(format!("read error: {e}")))?;
        self.pos += v.len() as u64;
        if (v.len() as u64) != n {
            return Err(err(format!(
                "truncated pickle: an item declares {n} bytes, only {} remain",
                v.len()
            )));
        }
        Ok(v)
    }

    /// A `\n`-terminated line of at most 256 bytes (GLOBAL operands).
    fn line(&mut self) -> Result<String> {
        let mut v = Vec::new();
        loop {
            let b = self.byte()?;
            if b == b'\n' {
                break;
            }
            if v.len() >= 256 {
                return Err(err("GLOBAL operand longer than 256 bytes"));
            }
            v.push(b);
        }
        String::from_utf8(v).map_err(|_| err("GLOBAL operand is not UTF-8"))
    }

    fn string(&mut self, n: u64) -> Result<String> {
        String::from_utf8(self.bytes(n)?).map_err(|_| err("string is not valid UTF-8"))
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            Global::RebuildTensor
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameter,
        ("torch", s) if PtDtype::from_storage(s).is_some() => {
            Global::Storage(PtDtype::from_storage(s).ok_or_else(|| err("unreachable"))?)
        }
        _ => {
            return Err(err(format!(
                "global `{module}.{name}` is not allowed: only torch state-dict globals \
                 (collections.OrderedDict, torch._utils._rebuild_*, torch.*Storage) are \
                 accepted; nothing is imported or called"
            )))
        }
    };
    Ok(g)
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| err(format!("{what} is negative: {i}"))),
        Value::Bool(b) => Ok(*b as usize),
        other => Err(err(format!("{what} must be an int, got {}", other.kind()))),
    }
}

fn usize_tuple(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items, _) | Value::List(items, _) => {
            items.iter().map(|i| as_usize(i, what)).collect()
        }
        other => Err(err(format!("{what} must be a tuple, got {}", other.kind()))),
    }
}

/// Apply an allowed callable to its arguments, structurally.
fn call(g: Global, args: Vec<Value>) -> Result<Value> {
    match g {
        Global::OrderedDict => {
            if args.is_empty() {
                Ok(Value::Dict(Vec::new(), 1))
            } else {
                Err(err("OrderedDict called with arguments"))
            }
        }
        Global::RebuildTensor => {
            if args.len() < 4 {
                return Err(err(format!(
                    "_rebuild_tensor_v2 needs at least 4 arguments, got {}",
                    args.len()
                )));
            }
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => {
                    return Err(err(format!(
                        "_rebuild_tensor_v2: first argument must be a storage, got {}",
                        other.kind()
                    )))
                }
            };
            let offset = as_usize(&args[1], "storage offset")?;
            let shape = usize_tuple(&args[2], "tensor size")?;
            let stride = usize_tuple(&args[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(err(format!(
                    "tensor size {shape:?} and stride {stride:?} differ in length"
                )));
            }
            Ok(Value::Tensor(TensorInfo {
                dtype: storage.dtype,
                shape,
                stride,
                offset,
                storage: storage.key,
            }))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(err("_rebuild_parameter: first argument must be a tensor")),
        },
        Global::Storage(d) => Err(err(format!(
            "calling storage type {d} is not supported (only persistent storages are)"
        ))),
    }
}

fn persistent_load(pid: Value) -> Result<Value> {
    let items = match pid {
        Value::Tuple(items, _) => items,
        other => {
            return Err(err(format!(
                "persistent id must be a tuple, got {}",
                other.kind()
            )))
        }
    };
    match items.first() {
        Some(Value::Str(s)) if s == "storage" => {}
        _ => return Err(err("persistent id is not a ('storage', …) tuple")),
    }
    if items.len() < 5 {
        return Err(err("persistent storage id has fewer than 5 fields"));
    }
    let dtype = match &items[1] {
        Value::Global(Global::Storage(d)) => *d,
        other => {
            return Err(err(format!(
                "persistent storage type must be a torch storage class, got {}",
                other.kind()
            )))
        }
    };
    let key = match &items[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => {
            return Err(err(format!(
                "storage key must be a string, got {}",
                other.kind()
            )))
        }
    };
    let numel = as_usize(&items[4], "storage size")? as u64;
    if let Some(view) = items.get(5) {
        if *view != Value::None {
            return Err(err("legacy storage views are not supported"));
        }
    }
    Ok(Value::Storage(StorageRef { dtype, key, numel }))
}

struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    budget: u64,
}

impl Machine {
    /// A machine for a pickle of `len` bytes (see [`MEMO_BUDGET`]).
    fn new(len: u64) -> Self {
        Machine {
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            budget: MEMO_BUDGET.min((1 << 20) + len.saturating_mul(64)),
        }
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(err("corrupted MARK"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .ok_or_else(|| err("memoizing an empty stack"))?;
        let cost = v.cost();
        let v = v.clone();
        self.charge(cost)?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .ok_or_else(|| err(format!("memo key {idx} not found")))?;
        let cost = v.cost();
        let v = v.clone();
        self.charge(cost)?;
        self.stack.push(v);
        Ok(())
    }

    fn charge(&mut self, cost: u64) -> Result<()> {
        self.budget = self
            .budget
            .checked_sub(cost)
            .ok_or_else(|| err("pickle copies too much memoized data"))?;
        Ok(())
    }

    fn push_tuple(&mut self, items: Vec<Value>) -> Result<()> {
        let d = child_depth(&items)?;
        self.stack.push(Value::Tuple(items, d));
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(err("SETITEMS with an odd number of items"));
        }
        let new_depth = child_depth(&items)?;
        match self.top()? {
            Value::Dict(pairs, d) => {
                *d = (*d).max(new_depth);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                Ok(())
            }
            other => Err(err(format!("SETITEM(S) on a {}", other.kind()))),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        let new_depth = child_depth(&items)?;
        match self.top()? {
            Value::List(v, d) => {
                *d = (*d).max(new_depth);
                v.extend(items);
                Ok(())
            }
            other => Err(err(format!("APPEND(S) on a {}", other.kind()))),
        }
    }

    /// Run one pickle to its STOP and return the object it builds.
    fn run<R: Read>(&mut self, src: &mut Src<R>) -> Result<Value> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            let op = src.byte()?;
            match op {
                0x80 => {
                    let p = src.byte()?;
                    if p > 5 {
                        return Err(err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    src.array::<8>()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new(), 1)),
                b']' => self.stack.push(Value::List(Vec::new(), 1)),
                b')' => self.stack.push(Value::Tuple(Vec::new(), 1)),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_tuple(items)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let d = child_depth(&items)?;
                    self.stack.push(Value::List(items, d));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new(), 1));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.charge(v.cost())?;
                    self.stack.push(v);
                }
                b'J' => self
                    .stack
                    .push(Value::Int(i32::from_le_bytes(src.array()?) as i64)),
                b'K' => self.stack.push(Value::Int(src.byte()? as i64)),
                b'M' => self
                    .stack
                    .push(Value::Int(u16::from_le_bytes(src.array()?) as i64)),
                0x8a => {
                    let n = src.byte()? as u64;
                    let b = src.bytes(n)?;
                    self.stack.push(long_value(b));
                }
                0x8b => {
                    let n = i32::from_le_bytes(src.array()?);
                    let n = u64::try_from(n).map_err(|_| err("LONG4 with negative length"))?;
                    let b = src.bytes(n)?;
                    self.stack.push(long_value(b));
                }
                b'G' => self
                    .stack
                    .push(Value::Float(f64::from_be_bytes(src.array()?))),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                0x8c => {
                    let n = src.byte()? as u64;
                    self.stack.push(Value::Str(src.string(n)?));
                }
                b'X' => {
                    let n = u32::from_le_bytes(src.array()?) as u64;
                    self.stack.push(Value::Str(src.string(n)?));
                }
                0x8d => {
                    let n = u64::from_le_bytes(src.array()?);
                    self.stack.push(Value::Str(src.string(n)?));
                }
                b'U' => {
                    let n = src.byte()? as u64;
                    let b = src.bytes(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'T' => {
                    let n = i32::from_le_bytes(src.array()?);
                    let n = u64::try_from(n).map_err(|_| err("BINSTRING with negative length"))?;
                    let b = src.bytes(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'C' => {
                    let n = src.byte()? as u64;
                    self.stack.push(Value::Bytes(src.bytes(n)?));
                }
                b'B' => {
                    let n = u32::from_le_bytes(src.array()?) as u64;
                    self.stack.push(Value::Bytes(src.bytes(n)?));
                }
                0x8e => {
                    let n = u64::from_le_bytes(src.array()?);
                    self.stack.push(Value::Bytes(src.bytes(n)?));
                }
                b'c' => {
                    let module = src.line()?;
                    let name = src.line()?;
                    self.stack
                        .push(Value::Global(resolve_global(&module, &name)?));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(resolve_global(&m, &n)?))
                        }
                        _ => return Err(err("STACK_GLOBAL operands must be strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?);
                }
                b'R' | 0x81 => {
                    let args = match self.pop()? {
                        Value::Tuple(items, _) => items,
                        other => {
                            return Err(err(format!(
                                "REDUCE arguments must be a tuple, got {}",
                                other.kind()
                            )))
                        }
                    };
                    let g = match self.pop()? {
                        Value::Global(g) => g,
                        other => {
                            return Err(err(format!("cannot call a {}", other.kind())));
                        }
                    };
                    self.stack.push(call(g, args)?);
                }
                b'b' => {
                    // BUILD sets an object's state (e.g. a state dict's `_metadata`): ignored.
                    self.pop()?;
                    match self.top()? {
                        Value::Dict(..) | Value::Tensor(_) => {}
                        other => return Err(err(format!("BUILD on a {}", other.kind()))),
                    }
                }
                b'q' => {
                    let i = src.byte()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(src.array()?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| err("memo too large"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = src.byte()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(src.array()?);
                    self.memo_get(i)?;
                }
                other => {
                    return Err(err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        src.pos.saturating_sub(1)
                    )))
                }
            }
        }
    }
}

fn long_value(b: Vec<u8>) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(&b);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(b)
    }
}

// ---------------------------------------------------------------------------
// The file.

#[derive(Debug, Clone)]
enum StorageData {
    /// Raw bytes at `start..start + len` of the file.
    Raw { start: u64, len: u64 },
    /// A deflated zip entry; `len` is its uncompressed size.
    Deflated { entry: usize, len: u64 },
}

impl StorageData {
    fn len(&self) -> u64 {
        match self {
            StorageData::Raw { len, .. } | StorageData::Deflated { len, .. } => *len,
        }
    }
}

/// An open PyTorch state dict (`torch.save` output, zip or legacy form).
///
/// ```no_run
/// use candle_core::Device;
/// use sae_ablate::io::pickle::PthFile;
/// # fn main() -> sae_ablate::Result<()> {
/// let f = PthFile::open("ae.pt")?;
/// for name in f.names() {
///     println!("{name}: {:?}", f.shape(name));
/// }
/// let w = f.load("encoder.weight", &Device::Cpu)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PthFile {
    path: PathBuf,
    file: File,
    tensors: Vec<(String, TensorInfo)>,
    index: HashMap<String, usize>,
    scalars: Vec<(String, Scalar)>,
    storages: HashMap<String, StorageData>,
    big_endian: bool,
    legacy: bool,
}

impl PthFile {
    /// Open `path`, run its pickle, and check every tensor against its storage and the
    /// file length. Nothing is loaded yet. Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        Self::open_inner(&path).map_err(|e| e.in_file(&path))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 4];
        let n = read_at(&file, &mut head[..file_len.min(4) as usize], 0)
            .map(|()| file_len.min(4) as usize)
            .map_err(|e| Error::io(path, e))?;
        let (root, storages, big_endian, legacy) = if n == 4 && head == *b"PK\x03\x04" {
            let (root, storages, be) = open_zip(&file, file_len)?;
            (root, storages, be, false)
        } else if n >= 1 && head[0] == 0x80 {
            let (root, storages, be) = open_legacy(&file, file_len)?;
            (root, storages, be, true)
        } else {
            return Err(err(
                "not a PyTorch file (neither a zip archive nor a legacy pickle)",
            ));
        };
        let (tensors, scalars) = collect(root)?;
        let mut index = HashMap::new();
        for (i, (name, info)) in tensors.iter().enumerate() {
            if index.insert(name.clone(), i).is_some() {
                return Err(err(format!("tensor `{name}` appears twice")));
            }
            validate(name, info, &storages)?;
        }
        Ok(PthFile {
            path: path.to_path_buf(),
            file,
            tensors,
            index,
            scalars,
            storages,
            big_endian,
            legacy,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is in the legacy (non-zip, torch < 1.6) form.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// Whether the stored data is big-endian (it is byte-swapped on load).
    pub fn is_big_endian(&self) -> bool {
        self.big_endian
    }

    /// Names of all tensors, in the order the file stores them.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Storage description of tensor `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// The stored shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|i| i.shape.as_slice())
    }

    /// The stored element type of tensor `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<PtDtype> {
        self.info(name).map(|i| i.dtype)
    }

    /// The non-tensor entries (ints, floats, bools, strings) of the state dict.
    pub fn scalars(&self) -> &[(String, Scalar)] {
        &self.scalars
    }

    /// The non-tensor entry `name`, if present.
    pub fn scalar(&self, name: &str) -> Option<&Scalar> {
        self.scalars.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Load tensor `name` in its stored dtype (f32, f16, bf16; f64 narrowed to f32;
    /// int64/int32/int16/uint8 as such). A tensor stored as a permuted view (e.g. a
    /// transposed matrix) comes back as the same permuted view of its contiguous
    /// storage, without a copy. Errors name the file and tensor.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.load_inner(name, device)
            .map_err(|e| e.in_file(&self.path))
    }

    /// Load tensor `name` if present.
    pub fn load_opt(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.load(name, device).map(Some)
        } else {
            Ok(None)
        }
    }

    fn load_inner(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let (storage_shape, perm) = layout(name, info)?;
        let numel = info.numel().ok_or_else(|| err("size overflow"))?;
        let es = info.dtype.size() as u64;
        let data = self
            .storages
            .get(&info.storage)
            .ok_or_else(|| err(format!("storage `{}` not found", info.storage)))?;
        // validate() checked offset + span <= storage elements at open.
        let skip = (info.offset as u64)
            .checked_mul(es)
            .ok_or_else(|| err("offset overflow"))?;
        let t = match info.dtype {
            PtDtype::F32 => self.read_tensor::<f32>(data, skip, numel, &storage_shape, device)?,
            PtDtype::F16 => self.read_tensor::<f16>(data, skip, numel, &storage_shape, device)?,
            PtDtype::BF16 => self.read_tensor::<bf16>(data, skip, numel, &storage_shape, device)?,
            PtDtype::F64 => self
                .read_tensor::<f64>(data, skip, numel, &storage_shape, device)?
                .to_dtype(DType::F32)?,
            PtDtype::I64 => self.read_tensor::<i64>(data, skip, numel, &storage_shape, device)?,
            PtDtype::I32 => self.read_tensor::<i32>(data, skip, numel, &storage_shape, device)?,
            PtDtype::I16 => self.read_tensor::<i16>(data, skip, numel, &storage_shape, device)?,
            PtDtype::U8 | PtDtype::Bool => {
                self.read_tensor::<u8>(data, skip, numel, &storage_shape, device)?
            }
            PtDtype::I8 => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: info.dtype.as_str().to_string(),
                })
            }
        };
        match perm {
            Some(p) => Ok(t.permute(p)?),
            None => Ok(t),
        }
    }

    fn read_tensor<T: Pod>(
        &self,
        data: &StorageData,
        skip: u64,
        numel: usize,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let mut v: Vec<T> = vec![T::default(); numel];
        {
            let bytes = as_bytes_mut(&mut v);
            match data {
                StorageData::Raw { start, .. } => {
                    let at = start
                        .checked_add(skip)
                        .ok_or_else(|| err("offset overflow"))?;
                    read_at(&self.file, bytes, at).map_err(|e| Error::io(&self.path, e))?;
                }
                StorageData::Deflated { entry, .. } => {
                    let mut z =
                        zip::ZipArchive::new(&self.file).map_err(|e| err(format!("zip: {e}")))?;
                    let mut f = z
                        .by_index(*entry)
                        .map_err(|e| err(format!("zip entry: {e}")))?;
                    let skipped = std::io::copy(&mut (&mut f).take(skip), &mut std::io::sink())
                        .map_err(|e| err(format!("zip entry: {e}")))?;
                    if skipped != skip {
                        return Err(err("compressed storage shorter than declared"));
                    }
                    f.read_exact(bytes)
                        .map_err(|e| err(format!("compressed storage: {e}")))?;
                }
            }
            if self.big_endian && std::mem::size_of::<T>() > 1 {
                for c in bytes.chunks_exact_mut(std::mem::size_of::<T>()) {
                    c.reverse();
                }
            }
        }
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// Plain-old-data element types: every bit pattern is a valid value.
trait Pod: candle_core::WithDType + Default + Copy {}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for f16 {}
impl Pod for bf16 {}
impl Pod for i64 {}
impl Pod for i32 {}
impl Pod for i16 {}
impl Pod for u8 {}

fn as_bytes_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    let n = std::mem::size_of_val(v);
    // SAFETY: `T` is a plain numeric type without padding for which every bit
    // pattern is valid; the slice covers exactly the vector's initialised elements.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n) }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, at)
}

#[cfg(not(unix))]
fn read_at(mut file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(buf)
}

/// For a dense but possibly permuted layout: the contiguous storage shape, and the
/// permutation that maps it back to the tensor's dimensions (`None` if already
/// contiguous). Other layouts (overlapping, gapped) are rejected.
fn layout(name: &str, info: &TensorInfo) -> Result<(Vec<usize>, Option<Vec<usize>>)> {
    let n = info.shape.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Outermost first: larger strides first; size-1 dims (any stride) go innermost.
    order.sort_by(|&a, &b| {
        let ka = (info.shape[a] != 1, info.stride[a]);
        let kb = (info.shape[b] != 1, info.stride[b]);
        kb.cmp(&ka)
    });
    let mut expected = 1usize;
    for &d in order.iter().rev() {
        if info.shape[d] != 1 && info.stride[d] != expected {
            return Err(err(format!(
                "tensor `{name}` has an unsupported memory layout (size {:?}, stride {:?}): \
                 only dense, possibly permuted, layouts are supported",
                info.shape, info.stride
            )));
        }
        expected = expected
            .checked_mul(info.shape[d])
            .ok_or_else(|| err("size overflow"))?;
    }
    let storage_shape: Vec<usize> = order.iter().map(|&d| info.shape[d]).collect();
    let identity = order.iter().enumerate().all(|(i, &d)| i == d);
    if identity {
        return Ok((storage_shape, None));
    }
    // Tensor dim j lives at position pos[j] of the storage shape.
    let mut pos = vec![0usize; n];
    for (i, &d) in order.iter().enumerate() {
        pos[d] = i;
    }
    Ok((storage_shape, Some(pos)))
}

/// Check a tensor against its storage: the dtype agrees and every element it
/// addresses lies inside the storage (which lies inside the file).
fn validate(name: &str, info: &TensorInfo, storages: &HashMap<String, StorageData>) -> Result<()> {
    let data = storages.get(&info.storage).ok_or_else(|| {
        err(format!(
            "tensor `{name}`: storage `{}` is missing from the file",
            info.storage
        ))
    })?;
    let es = info.dtype.size() as u64;
    let available = data.len() / es;
    let numel = info
        .numel()
        .ok_or_else(|| err(format!("tensor `{name}`: size {:?} overflows", info.shape)))?;
    if numel == 0 {
        return Ok(());
    }
    // Highest element index addressed, plus one.
    let mut span: u64 = 1;
    for (&s, &st) in info.shape.iter().zip(&info.stride) {
        let extra = (s as u64 - 1)
            .checked_mul(st as u64)
            .ok_or_else(|| err(format!("tensor `{name}`: stride overflow")))?;
        span = span
            .checked_add(extra)
            .ok_or_else(|| err(format!("tensor `{name}`: stride overflow")))?;
    }
    let end = span
        .checked_add(info.offset as u64)
        .ok_or_else(|| err(format!("tensor `{name}`: offset overflow")))?;
    if end > available {
        return Err(err(format!(
            "tensor `{name}` (size {:?}, stride {:?}, offset {}) needs {end} {} elements \
             but its storage `{}` holds only {available}",
            info.shape, info.stride, info.offset, info.dtype, info.storage
        )));
    }
    // Dense layouts read exactly numel elements; make sure the layout is one we load.
    layout(name, info)?;
    Ok(())
}

type Storages = HashMap<String, StorageData>;

fn open_zip(file: &File, file_len: u64) -> Result<(Value, Storages, bool)> {
    let mut z = zip::ZipArchive::new(file).map_err(|e| err(format!("zip archive: {e}")))?;
    let names: Vec<String> = z
        .file_names()
        .filter_map(|s| s.ok().map(|s| s.into_owned()))
        .collect();
    let pkl = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.matches('/').count())
        .ok_or_else(|| err("zip archive has no data.pkl"))?
        .clone();
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();

    let big_endian = match z.index_for_name(&format!("{prefix}byteorder")) {
        Some(i) => {
            let f = z.by_index(i).map_err(|e| err(format!("zip: {e}")))?;
            let mut s = String::new();
            f.take(16)
                .read_to_string(&mut s)
                .map_err(|e| err(format!("byteorder: {e}")))?;
            match s.trim() {
                "little" => false,
                "big" => true,
                other => return Err(err(format!("unknown byteorder `{other}`"))),
            }
        }
        None => false,
    };

    let root = {
        let f = z.by_name(&pkl).map_err(|e| err(format!("zip: {e}")))?;
        let len = f.size();
        let mut src = Src::new(BufReader::new(f));
        Machine::new(len).run(&mut src)?
    };

    let mut storages = HashMap::new();
    for key in storage_keys(&root) {
        let entry = format!("{prefix}data/{key}");
        let idx = z.index_for_name(&entry).ok_or_else(|| {
            err(format!(
                "storage `{key}` has no entry `{entry}` in the archive"
            ))
        })?;
        let f = z.by_index_raw(idx).map_err(|e| err(format!("zip: {e}")))?;
        let data = match f.compression() {
            zip::CompressionMethod::Stored => {
                let start = f
                    .data_start()
                    .ok_or_else(|| err(format!("zip entry `{entry}` has no data offset")))?;
                let len = f.size();
                let end = start
                    .checked_add(len)
                    .ok_or_else(|| err("offset overflow"))?;
                if f.compressed_size() != len || end > file_len {
                    return Err(err(format!(
                        "zip entry `{entry}` ({len} bytes at {start}) extends past the end of \
                         the file ({file_len} bytes)"
                    )));
                }
                StorageData::Raw { start, len }
            }
            zip::CompressionMethod::Deflated => {
                // Deflate expands at most ~1032:1; a larger claim cannot be real data.
                let limit = f
                    .compressed_size()
                    .saturating_mul(1032)
                    .saturating_add(1024);
                if f.size() > limit || f.compressed_size() > file_len {
                    return Err(err(format!(
                        "zip entry `{entry}` claims {} bytes from {} compressed bytes",
                        f.size(),
                        f.compressed_size()
                    )));
                }
                StorageData::Deflated {
                    entry: idx,
                    len: f.size(),
                }
            }
            other => {
                return Err(err(format!(
                    "zip entry `{entry}` uses unsupported compression {other:?}"
                )))
            }
        };
        storages.insert(key, data);
    }
    Ok((root, storages, big_endian))
}

fn open_legacy(file: &File, file_len: u64) -> Result<(Value, Storages, bool)> {
    let mut src = Src::new(BufReader::new(file));
    let mut m = Machine::new(file_len);
    let magic = m.run(&mut src)?;
    let magic_ok = match &magic {
        Value::BigInt(b) if b.len() <= 16 => {
            let mut buf = [0u8; 16];
            buf[..b.len()].copy_from_slice(b);
            u128::from_le_bytes(buf) == LEGACY_MAGIC
        }
        _ => false,
    };
    if !magic_ok {
        return Err(err(
            "not a PyTorch file: a pickle without torch's legacy magic number",
        ));
    }
    match m.run(&mut src)? {
        Value::Int(1001) => {}
        other => {
            // The kind, not the value: a hostile "version" can be a huge object.
            return Err(err(match other {
                Value::Int(v) => format!("unsupported legacy protocol version {v}"),
                other => format!("legacy protocol version is a {}, not an int", other.kind()),
            }));
        }
    }
    let sys_info = m.run(&mut src)?;
    let mut big_endian = false;
    if let Value::Dict(items, _) = &sys_info {
        for (k, v) in items {
            if let (Value::Str(k), Value::Bool(b)) = (k, v) {
                if k == "little_endian" {
                    big_endian = !b;
                }
            }
        }
    }
    let root = m.run(&mut src)?;
    let keys = match m.run(&mut src)? {
        Value::List(items, _) | Value::Tuple(items, _) => items
            .into_iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s),
                Value::Int(i) => Ok(i.to_string()),
                other => Err(err(format!(
                    "storage key must be a string, got {}",
                    other.kind()
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        other => {
            return Err(err(format!(
                "legacy storage key list must be a list, got {}",
                other.kind()
            )))
        }
    };
    // Element sizes come from the storage types the object references.
    let mut dtypes: HashMap<String, PtDtype> = HashMap::new();
    visit_storages(&root, &mut |s| {
        dtypes.insert(s.key.clone(), s.dtype);
    });
    let mut pos = src.pos;
    let mut storages = HashMap::new();
    for key in keys {
        let mut cnt = [0u8; 8];
        let header_end = pos.checked_add(8).ok_or_else(|| err("offset overflow"))?;
        if header_end > file_len {
            return Err(err(format!(
                "truncated file: storage `{key}` header at byte {pos} is past the end ({file_len} bytes)"
            )));
        }
        read_at(file, &mut cnt, pos).map_err(|e| err(format!("read error: {e}")))?;
        let count = if big_endian {
            u64::from_be_bytes(cnt)
        } else {
            u64::from_le_bytes(cnt)
        };
        let es = match dtypes.get(&key) {
            Some(d) => d.size() as u64,
            None => {
                return Err(err(format!(
                    "storage `{key}` is listed but no tensor uses it: its element size is unknown"
                )))
            }
        };
        let len = count
            .checked_mul(es)
            .ok_or_else(|| err(format!("storage `{key}` size overflows")))?;
        let end = header_end
            .checked_add(len)
            .ok_or_else(|| err("offset overflow"))?;
        if end > file_len {
            return Err(err(format!(
                "truncated file: storage `{key}` declares {count} elements ({len} bytes at byte \
                 {header_end}) but the file has {file_len} bytes"
            )));
        }
        storages.insert(
            key,
            StorageData::Raw {
                start: header_end,
                len,
            },
        );
        pos = end;
    }
    Ok((root, storages, big_endian))
}

fn visit_storages(v: &Value, f: &mut impl FnMut(&StorageRef)) {
    match v {
        Value::Storage(s) => f(s),
        Value::List(items, _) | Value::Tuple(items, _) => {
            items.iter().for_each(|i| visit_storages(i, f))
        }
        Value::Dict(items, _) => items.iter().for_each(|(k, v)| {
            visit_storages(k, f);
            visit_storages(v, f);
        }),
        Value::Tensor(t) => f(&StorageRef {
            dtype: t.dtype,
            key: t.storage.clone(),
            numel: 0,
        }),
        _ => {}
    }
}

fn storage_keys(root: &Value) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    visit_storages(root, &mut |s| {
        if !keys.contains(&s.key) {
            keys.push(s.key.clone());
        }
    });
    keys
}

type Collected = (Vec<(String, TensorInfo)>, Vec<(String, Scalar)>);

/// The tensors and scalars of the state dict: the top-level dict, or, when it holds
/// no tensors, a nested dict under `state_dict`, `model_state_dict`, `model`, … .
fn collect(root: Value) -> Result<Collected> {
    let items = match root {
        Value::Dict(items, _) => items,
        other => {
            return Err(err(format!(
                "the pickled object is a {}, not a state dict",
                other.kind()
            )))
        }
    };
    let has_tensors =
        |items: &[(Value, Value)]| items.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if !has_tensors(&items) {
        let preferred = ["state_dict", "model_state_dict", "model", "sae", "module"];
        let mut nested: Option<Vec<(Value, Value)>> = None;
        let mut best = usize::MAX;
        for (k, v) in &items {
            if let (Value::Str(k), Value::Dict(inner, _)) = (k, v) {
                if has_tensors(inner) {
                    let rank = preferred
                        .iter()
                        .position(|p| p == k)
                        .unwrap_or(preferred.len());
                    if rank < best {
                        best = rank;
                        nested = Some(inner.clone());
                    }
                }
            }
        }
        if let Some(inner) = nested {
            return collect_items(inner);
        }
    }
    collect_items(items)
}

fn collect_items(items: Vec<(Value, Value)>) -> Result<Collected> {
    let mut tensors = Vec::new();
    let mut scalars = Vec::new();
    for (k, v) in items {
        let Value::Str(k) = k else {
            continue;
        };
        match v {
            Value::Tensor(t) => tensors.push((k, t)),
            Value::Bool(b) => scalars.push((k, Scalar::Bool(b))),
            Value::Int(i) => scalars.push((k, Scalar::Int(i))),
            Value::Float(f) => scalars.push((k, Scalar::Float(f))),
            Value::Str(s) => scalars.push((k, Scalar::Str(s))),
            _ => {}
        }
    }
    Ok((tensors, scalars))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value> {
        Machine::new(bytes.len() as u64).run(&mut Src::new(bytes))
    }

    #[test]
    fn long1_sign_extends() {
        assert_eq!(long_value(vec![0xff]), Value::Int(-1));
        assert_eq!(long_value(vec![0x01, 0x01]), Value::Int(257));
    }

    #[test]
    fn rejects_unknown_global() {
        let e = run(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err().to_string();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn layout_of_transposed_matrix() -> crate::TestResult {
        let info = TensorInfo {
            dtype: PtDtype::F32,
            shape: vec![3, 2],
            stride: vec![1, 3],
            offset: 0,
            storage: "0".into(),
        };
        let (shape, perm) = layout("x", &info)?;
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(perm, Some(vec![1, 0]));
        let gapped = TensorInfo {
            stride: vec![4, 1],
            ..info
        };
        assert!(layout("x", &gapped).is_err());
        Ok(())
    }

    #[test]
    fn huge_declared_string_is_truncation_not_allocation() {
        let e = run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\x7fabc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
