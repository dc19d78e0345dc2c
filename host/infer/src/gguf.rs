//! Reading GGUF files: header, metadata, tensor infos and tensor data.
//!
//! The layout (version 2 and 3, little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, value_type: u32, value)
//! tensor_count × (name: string, n_dims: u32, dims: n_dims × u64, type: u32, offset: u64)
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset
//! ```
//!
//! A file is untrusted input: every count, length and offset is checked
//! against the bytes actually present before it is used, and problems come
//! back as [`GgufError`], never as a panic.
//!
//! ```
//! # use breakwater_infer::gguf::{Gguf, GgufError};
//! assert!(matches!(Gguf::from_bytes(b"GGU".to_vec()), Err(GgufError::Truncated { .. })));
//! assert!(matches!(Gguf::from_bytes(b"GGML".to_vec()), Err(GgufError::BadMagic(_))));
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nested arrays deeper than this are refused, so that a hostile file cannot
/// exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A GGUF version other than 2 or 3.
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    /// The file ends before a field it announces.
    #[error("file truncated: {what} at byte {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file.
        available: usize,
    },
    /// A string is not UTF-8.
    #[error("string at byte {offset} is not UTF-8")]
    InvalidUtf8 {
        /// Where the string's bytes start.
        offset: usize,
    },
    /// A metadata value type id that GGUF does not define.
    #[error("unknown metadata value type {ty} at byte {offset}")]
    UnknownValueType {
        /// The id found.
        ty: u32,
        /// Where it was found.
        offset: usize,
    },
    /// Arrays nested deeper than this reader accepts.
    #[error("metadata arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {offset}")]
    TooDeep {
        /// Where the innermost array starts.
        offset: usize,
    },
    /// The same metadata key or tensor name appears twice.
    #[error("duplicate {kind} {name:?}")]
    Duplicate {
        /// "metadata key" or "tensor".
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// `general.alignment` is zero, not a power of two, or not a u32.
    #[error("invalid general.alignment {0}")]
    BadAlignment(u64),
    /// A tensor type this reader does not support.
    #[error(
        "tensor {name:?} has type {ty}, which is not supported (F32, F16, Q4_0, Q4_1, Q8_0 are)"
    )]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// ggml's type id.
        ty: u32,
    },
    /// A tensor's shape is invalid for its type.
    #[error("tensor {name:?}: {reason}")]
    BadTensorShape {
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data lies outside the file or is not aligned.
    #[error("tensor {name:?}: data at offset {offset} (+{len} bytes) {reason}")]
    BadTensorOffset {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// Its size in bytes.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A metadata key the caller needs is absent.
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
    /// A metadata key has a different type than the caller needs.
    #[error("metadata key {key:?} should be {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What the caller needed.
        expected: &'static str,
    },
    /// A tensor the caller needs is absent.
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string`
    String(String),
    /// `array`, all elements of one type.
    Array(Vec<Value>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of
    /// any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml orders them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte range of the data within the whole file, already bounds-checked.
    pub range: Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file whose tensor data stays in the file's memory map.
pub struct Gguf {
    bytes: Arc<Backing>,
    version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Tensor bytes that keep the file they live in mapped.
#[derive(Clone)]
pub struct TensorBytes {
    backing: Arc<Backing>,
    range: Range<usize>,
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.range.clone()]
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({:?})", self.range)
    }
}

impl TensorBytes {
    /// Bytes held in memory: weights converted or reordered at load time.
    pub fn owned(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            backing: Arc::new(Backing::Owned(bytes)),
            range,
        }
    }

    /// The whole file at `path`, memory-mapped read-only.
    pub fn map_file(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: as in `Gguf::open`: model files land by write-then-rename
        // and are never modified in place.
        let map = unsafe { Mmap::map(&file) }?;
        let range = 0..map.len();
        Ok(Self {
            backing: Arc::new(Backing::Mapped(map)),
            range,
        })
    }

    /// The bytes at `range` within these, sharing their backing (no copy).
    ///
    /// # Panics
    ///
    /// If `range` is not within these bytes.
    pub fn slice(&self, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.range.len(),
            "slice {range:?} of {} bytes",
            self.range.len()
        );
        Self {
            backing: Arc::clone(&self.backing),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }
}

impl Gguf {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; model files land by write-then-rename
        // and are never modified in place, so the bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Backing::Mapped(map))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self, GgufError> {
        let mut r = Reader {
            buf: &backing,
            pos: 0,
        };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic([
                magic[0], magic[1], magic[2], magic[3],
            ]));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;

        // Each entry takes at least 12 bytes, so a count beyond that is a lie
        // and must not size an allocation.
        let mut metadata = HashMap::with_capacity(r.bounded_count(kv_count, 12, "metadata")?);
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, 0)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::Duplicate {
                    kind: "metadata key",
                    name: key,
                });
            }
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => return Err(GgufError::BadAlignment(v.as_u64().unwrap_or(0))),
        };

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            offset: u64,
            len: u64,
        }
        let mut raw = Vec::with_capacity(r.bounded_count(tensor_count, 24, "tensor infos")?);
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadTensorShape {
                    name,
                    reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let dims = (0..n_dims)
                .map(|_| r.u64("tensor dimension"))
                .collect::<Result<Vec<_>, _>>()?;
            let ty_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let Some(ty) = GgmlType::from_id(ty_id) else {
                return Err(GgufError::UnsupportedTensorType { name, ty: ty_id });
            };
            let bad_shape = |reason: String| GgufError::BadTensorShape {
                name: name.clone(),
                reason,
            };
            let count = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad_shape(format!("{dims:?} overflows")))?;
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(bad_shape(format!(
                    "rows of {} values are not whole {}-value blocks of {ty:?}",
                    dims[0],
                    ty.block_len()
                )));
            }
            let len = ty
                .bytes_for(count)
                .ok_or_else(|| bad_shape(format!("{dims:?} overflows")))?;
            raw.push(Raw {
                name,
                dims,
                ty,
                offset,
                len,
            });
        }

        let data_start = (r.pos as u64).next_multiple_of(alignment);
        let file_len = backing.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for t in raw {
            let bad = |reason| GgufError::BadTensorOffset {
                name: t.name.clone(),
                offset: t.offset,
                len: t.len,
                reason,
            };
            if t.offset % alignment != 0 {
                return Err(bad("is not aligned"));
            }
            let start = data_start.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.len));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad("overflows"));
            };
            if end > file_len {
                return Err(bad("runs past the end of the file"));
            }
            if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate {
                    kind: "tensor",
                    name: t.name,
                });
            }
            // Both fit in usize: they are at most the file's length.
            tensors.push(TensorInfo {
                name: t.name,
                dims: t.dims,
                ty: t.ty,
                range: start as usize..end as usize,
            });
        }

        Ok(Self {
            bytes: Arc::new(backing),
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// The metadata value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.required(key)?
            .as_u64()
            .ok_or_else(|| wrong_type(key, "an unsigned integer"))
    }

    /// A required unsigned integer that must fit a `usize`.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        usize::try_from(self.u64(key)?).map_err(|_| wrong_type(key, "a usize"))
    }

    /// A required float.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        self.required(key)?
            .as_f32()
            .ok_or_else(|| wrong_type(key, "a float"))
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.required(key)?
            .as_str()
            .ok_or_else(|| wrong_type(key, "a string"))
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[Value], GgufError> {
        self.required(key)?
            .as_array()
            .ok_or_else(|| wrong_type(key, "an array"))
    }

    fn required(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The data of the tensor named `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, TensorBytes), GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))?;
        let bytes = TensorBytes {
            backing: Arc::clone(&self.bytes),
            range: info.range.clone(),
        };
        Ok((info, bytes))
    }
}

fn wrong_type(key: &str, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &'static str, needed: u64) -> GgufError {
        GgufError::Truncated {
            what,
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(self.truncated(what, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `count` items of at least `min_size` bytes each must fit in what is
    /// left; returns the count as a capacity that is safe to reserve.
    fn bounded_count(
        &self,
        count: u64,
        min_size: u64,
        what: &'static str,
    ) -> Result<usize, GgufError> {
        match count.checked_mul(min_size) {
            Some(bytes) if bytes <= self.remaining() as u64 => Ok(count as usize),
            _ => Err(self.truncated(what, count.saturating_mul(min_size))),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let offset = self.pos;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        const WHAT: &str = "metadata value";
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(WHAT)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(WHAT)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(WHAT)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(WHAT)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(WHAT)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(WHAT)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(WHAT)?)),
            7 => Value::Bool(self.array::<1>(WHAT)?[0] != 0),
            8 => Value::String(self.string(WHAT)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooDeep { offset: self.pos });
                }
                let offset = self.pos;
                let elem_ty = self.u32("array element type")?;
                let len = self.u64("array length")?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    ty => return Err(GgufError::UnknownValueType { ty, offset }),
                };
                let mut items = Vec::with_capacity(self.bounded_count(len, min_size, WHAT)?);
                for _ in 0..len {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(WHAT)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(WHAT)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(WHAT)?)),
            ty => {
                return Err(GgufError::UnknownValueType {
                    ty,
                    offset: self.pos - 4,
                });
            }
        })
    }
}

/// Builds GGUF images in memory, for tests and test models.
pub mod writer {
    use super::{DEFAULT_ALIGNMENT, Value};
    use crate::quant::GgmlType;

    /// An in-memory GGUF (version 3) builder.
    ///
    /// ```
    /// # use breakwater_infer::gguf::{Gguf, Value, writer::GgufWriter};
    /// # use breakwater_infer::quant::GgmlType;
    /// let mut w = GgufWriter::default();
    /// w.metadata("general.architecture", Value::String("llama".into()));
    /// w.tensor("t", &[2], GgmlType::F32, [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect());
    /// let gguf = Gguf::from_bytes(w.finish()).unwrap();
    /// assert_eq!(gguf.str("general.architecture").unwrap(), "llama");
    /// ```
    #[derive(Debug, Default)]
    pub struct GgufWriter {
        metadata: Vec<(String, Value)>,
        tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    }

    impl GgufWriter {
        /// Adds a metadata entry.
        pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
            self.metadata.push((key.to_owned(), value));
            self
        }

        /// Adds a tensor with its raw data.
        pub fn tensor(
            &mut self,
            name: &str,
            dims: &[u64],
            ty: GgmlType,
            data: Vec<u8>,
        ) -> &mut Self {
            self.tensors
                .push((name.to_owned(), dims.to_vec(), ty, data));
            self
        }

        /// The file's bytes.
        pub fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(b"GGUF");
            out.extend(3u32.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.metadata.len() as u64).to_le_bytes());
            for (key, value) in &self.metadata {
                put_string(&mut out, key);
                out.extend(type_id(value).to_le_bytes());
                put_value(&mut out, value);
            }
            let align = DEFAULT_ALIGNMENT as usize;
            let mut offset = 0usize;
            for (name, dims, ty, data) in &self.tensors {
                put_string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.id().to_le_bytes());
                out.extend((offset as u64).to_le_bytes());
                offset = (offset + data.len()).next_multiple_of(align);
            }
            for (_, _, _, data) in &self.tensors {
                out.resize(out.len().next_multiple_of(align), 0);
                out.extend(data);
            }
            out
        }
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.extend(x.to_le_bytes()),
            Value::I8(x) => out.extend(x.to_le_bytes()),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => put_string(out, s),
            Value::Array(items) => {
                // An empty array's element type is arbitrary; u8 it is.
                out.extend(items.first().map_or(0, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::GgufWriter;
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::default();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("u8", Value::U8(7))
            .metadata("i8", Value::I8(-7))
            .metadata("u16", Value::U16(700))
            .metadata("i16", Value::I16(-700))
            .metadata("u32", Value::U32(70_000))
            .metadata("i32", Value::I32(-70_000))
            .metadata("f32", Value::F32(1.5))
            .metadata("bool", Value::Bool(true))
            .metadata("u64", Value::U64(1 << 40))
            .metadata("i64", Value::I64(-(1 << 40)))
            .metadata("f64", Value::F64(2.25))
            .metadata(
                "strings",
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            )
            .metadata(
                "nested",
                Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(-2)])]),
            );
        let f32s: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.tensor("a", &[4], GgmlType::F32, f32s);
        let mut q8 = vec![0u8; 34 * 2];
        q8[0..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        w.tensor("b", &[32, 2], GgmlType::Q8_0, q8);
        w.finish()
    }

    #[test]
    fn parses_every_value_type_and_tensor_infos() {
        let g = Gguf::from_bytes(sample()).expect("parses");
        assert_eq!(g.version(), 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get("u8"), Some(&Value::U8(7)));
        assert_eq!(g.get("i8"), Some(&Value::I8(-7)));
        assert_eq!(g.get("u16"), Some(&Value::U16(700)));
        assert_eq!(g.get("i16"), Some(&Value::I16(-700)));
        assert_eq!(g.u64("u32").unwrap(), 70_000);
        assert_eq!(g.get("i32").and_then(Value::as_i64), Some(-70_000));
        assert_eq!(g.f32("f32").unwrap(), 1.5);
        assert_eq!(g.get("bool").and_then(Value::as_bool), Some(true));
        assert_eq!(g.u64("u64").unwrap(), 1 << 40);
        assert_eq!(g.get("i64").and_then(Value::as_i64), Some(-(1 << 40)));
        assert_eq!(g.f32("f64").unwrap(), 2.25);
        assert_eq!(g.array("strings").unwrap()[1].as_str(), Some("bc"));
        assert_eq!(
            g.array("nested").unwrap()[0],
            Value::Array(vec![Value::I32(1), Value::I32(-2)])
        );
        assert!(matches!(g.u64("f32"), Err(GgufError::WrongType { .. })));
        assert!(matches!(g.u64("absent"), Err(GgufError::MissingKey(_))));

        let (a, bytes) = g.tensor_bytes("a").unwrap();
        assert_eq!(a.dims, vec![4]);
        assert_eq!(a.range.start % 32, 0);
        assert_eq!(&bytes[4..8], &1.0f32.to_le_bytes());
        let (b, bytes) = g.tensor_bytes("b").unwrap();
        assert_eq!((b.ty, b.len(), bytes.len()), (GgmlType::Q8_0, 64, 68));
        assert!(matches!(
            g.tensor_bytes("c"),
            Err(GgufError::MissingTensor(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let result = Gguf::from_bytes(bytes[..len].to_vec());
            assert!(result.is_err(), "truncated to {len} bytes parsed");
        }
    }

    #[test]
    fn corrupt_fields_are_reported() {
        let good = sample();
        let with = |at: usize, patch: &[u8]| {
            let mut b = good.clone();
            b[at..at + patch.len()].copy_from_slice(patch);
            Gguf::from_bytes(b)
        };
        assert!(matches!(with(0, b"GGML"), Err(GgufError::BadMagic(_))));
        assert!(matches!(
            with(4, &9u32.to_le_bytes()),
            Err(GgufError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            with(16, &u64::MAX.to_le_bytes()),
            Err(GgufError::Truncated { .. })
        ));
        // The first key's value type follows its 8-byte length and 20 bytes.
        assert!(matches!(
            with(24 + 8 + 20, &99u32.to_le_bytes()),
            Err(GgufError::UnknownValueType { ty: 99, .. })
        ));
        assert!(matches!(
            with(24 + 8, &[0xff]),
            Err(GgufError::InvalidUtf8 { .. })
        ));

        let ty_at = find_tensor_tail(&good, "b");
        assert!(matches!(
            with(ty_at, &13u32.to_le_bytes()),
            Err(GgufError::UnsupportedTensorType { ty: 13, .. })
        ));
        assert!(matches!(
            with(ty_at + 4, &1u64.to_le_bytes()),
            Err(GgufError::BadTensorOffset { .. })
        ));
        assert!(matches!(
            with(ty_at + 4, &(1u64 << 20).to_le_bytes()),
            Err(GgufError::BadTensorOffset { .. })
        ));
        assert!(matches!(
            with(ty_at + 4, &(u64::MAX - 31).to_le_bytes()),
            Err(GgufError::BadTensorOffset { .. })
        ));
    }

    /// A GGUF header with `tensors` tensor infos and `kvs` metadata entries
    /// announced, followed by `rest`.
    fn header(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kvs.to_le_bytes());
        b.extend(rest);
        b
    }

    /// Asserts `bytes` are refused as truncated, naming `what` and `needed`.
    fn assert_refused(bytes: Vec<u8>, what: &str, needed: u64) {
        match Gguf::from_bytes(bytes) {
            Err(e @ GgufError::Truncated { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(what) && message.contains(&format!("needs {needed} bytes")),
                    "{message}"
                );
            }
            other => panic!("expected a truncation error, got {other:?}"),
        }
    }

    // A file from a store is untrusted: no length it announces may size an
    // allocation before the bytes are there to back it.
    const HUGE: u64 = 1 << 60;

    #[test]
    fn an_array_length_of_2_pow_60_is_refused_without_allocating() {
        let mut kv = 1u64.to_le_bytes().to_vec();
        kv.extend(b"k");
        kv.extend(9u32.to_le_bytes()); // array
        kv.extend(0u32.to_le_bytes()); // of u8
        kv.extend(HUGE.to_le_bytes());
        assert_refused(header(0, 1, &kv), "metadata value", HUGE);
        // Arrays of arrays: each element takes at least 12 bytes.
        kv.truncate(kv.len() - 12);
        kv.extend(9u32.to_le_bytes());
        kv.extend(HUGE.to_le_bytes());
        assert_refused(header(0, 1, &kv), "metadata value", HUGE.saturating_mul(12));
    }

    #[test]
    fn a_string_length_of_2_pow_60_is_refused_without_allocating() {
        // Enough bytes after the length for the one entry announced, so the
        // key's own length is what is refused.
        let mut key = HUGE.to_le_bytes().to_vec();
        key.extend([0; 8]);
        assert_refused(header(0, 1, &key), "metadata key", HUGE);
        let mut kv = 1u64.to_le_bytes().to_vec();
        kv.extend(b"k");
        kv.extend(8u32.to_le_bytes()); // string
        kv.extend(HUGE.to_le_bytes());
        assert_refused(header(0, 1, &kv), "metadata value", HUGE);
    }

    #[test]
    fn counts_of_2_pow_60_are_refused_without_allocating() {
        assert_refused(header(0, HUGE, &[]), "metadata", HUGE.saturating_mul(12));
        assert_refused(
            header(HUGE, 0, &[]),
            "tensor infos",
            HUGE.saturating_mul(24),
        );
    }

    #[test]
    fn tensor_sizes_that_overflow_are_refused() {
        let mut info = 1u64.to_le_bytes().to_vec();
        info.extend(b"t");
        info.extend(3u32.to_le_bytes());
        for _ in 0..3 {
            info.extend((1u64 << 32).to_le_bytes());
        }
        info.extend(GgmlType::F32.id().to_le_bytes());
        info.extend(0u64.to_le_bytes());
        assert!(matches!(
            Gguf::from_bytes(header(1, 0, &info)),
            Err(GgufError::BadTensorShape { .. })
        ));
        // 2^60 values of 4 bytes fit a u64 count but not the file.
        let mut info = 1u64.to_le_bytes().to_vec();
        info.extend(b"t");
        info.extend(1u32.to_le_bytes());
        info.extend(HUGE.to_le_bytes());
        info.extend(GgmlType::F32.id().to_le_bytes());
        info.extend(0u64.to_le_bytes());
        assert!(matches!(
            Gguf::from_bytes(header(1, 0, &info)),
            Err(GgufError::BadTensorShape { .. } | GgufError::BadTensorOffset { .. })
        ));
    }

    /// Byte position of the type field of tensor `name`'s info.
    fn find_tensor_tail(bytes: &[u8], name: &str) -> usize {
        let mut needle = (name.len() as u64).to_le_bytes().to_vec();
        needle.extend(name.as_bytes());
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("tensor name present");
        let dims_at = at + needle.len();
        let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
        dims_at + 4 + 8 * n_dims
    }

    #[test]
    fn bad_shapes_and_alignment_are_refused() {
        let mut w = GgufWriter::default();
        w.tensor("q", &[16], GgmlType::Q4_1, vec![0; 10]);
        assert!(matches!(
            Gguf::from_bytes(w.finish()),
            Err(GgufError::BadTensorShape { .. })
        ));

        let mut w = GgufWriter::default();
        w.metadata("general.alignment", Value::U32(3));
        assert!(matches!(
            Gguf::from_bytes(w.finish()),
            Err(GgufError::BadAlignment(3))
        ));

        let mut w = GgufWriter::default();
        w.tensor("x", &[4], GgmlType::F32, vec![0; 16]);
        w.tensor("x", &[4], GgmlType::F32, vec![0; 16]);
        assert!(matches!(
            Gguf::from_bytes(w.finish()),
            Err(GgufError::Duplicate { .. })
        ));

        let mut deep = Value::I32(0);
        for _ in 0..=MAX_ARRAY_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        let mut w = GgufWriter::default();
        w.metadata("deep", deep);
        assert!(matches!(
            Gguf::from_bytes(w.finish()),
            Err(GgufError::TooDeep { .. })
        ));
    }
}
