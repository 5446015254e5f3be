//! Safetensors checkpoints: memory-mapped reading with every tensor checked
//! for name, dtype, shape and finiteness before it reaches the model, and
//! atomic writing (temp file + rename) for the writers of checkpoints.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, Metadata, SafeTensorError};

use super::error::{Result, WorldError};

/// Length of the little-endian u64 that opens every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// `__metadata__` key saying what a file is for; see [`ROLE_TEACHER`].
pub const ROLE_KEY: &str = "role";
/// The role of the EMA teacher encoder a training run writes beside the
/// model (`*_teacher.safetensors`): for resuming training, not inference.
pub const ROLE_TEACHER: &str = "teacher";

/// Where a checkpoint's bytes live.
enum Bytes {
    /// A file mapped into memory.
    Mapped(Mmap),
    /// Bytes compiled into the binary (the embedded default model).
    Static(&'static [u8]),
    /// Bytes in memory (the fuzz targets).
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
            Bytes::Owned(v) => v,
        }
    }
}

/// A safetensors file mapped into memory with its header parsed.
///
/// Tensors are copied out on request ([`Checkpoint::matrix`],
/// [`Checkpoint::vector`]) because the mapped bytes carry no alignment
/// guarantee for `f32`.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    header: Metadata,
}

impl Checkpoint {
    /// Maps `path` and validates its header against the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| WorldError::io(&path, e))?;
        if file
            .metadata()
            .map_err(|e| WorldError::io(&path, e))?
            .is_dir()
        {
            return Err(WorldError::NotSafetensors {
                path,
                reason: "it is a directory".into(),
            });
        }
        // SAFETY: the map is read-only and private to this process; a
        // checkpoint being rewritten under a running process is not a
        // supported use (writers here replace files by rename, which leaves
        // this mapping on the old inode).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WorldError::io(&path, e))?;
        Self::parse(path, Bytes::Mapped(mmap))
    }

    /// Reads a checkpoint compiled into the binary; `name` stands in for
    /// the path in messages.
    pub fn from_static(name: impl Into<PathBuf>, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(name.into(), Bytes::Static(bytes))
    }

    /// Reads a checkpoint from bytes in memory; `name` stands in for the
    /// path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| classify(&path, &bytes, e))?;
        Ok(Self {
            path,
            data_start: HEADER_LEN_BYTES + header_len,
            bytes,
            header,
        })
    }

    /// Whether the file is a training-only teacher encoder.
    pub fn is_teacher(&self) -> bool {
        self.metadata()
            .and_then(|m| m.get(ROLE_KEY))
            .is_some_and(|r| r == ROLE_TEACHER)
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map, if the writer stored one.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.header.metadata().as_ref()
    }

    /// Reads a positive integer from `__metadata__`; `None` when absent.
    pub fn metadata_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(value) = self.metadata().and_then(|m| m.get(key)) else {
            return Ok(None);
        };
        match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(WorldError::Metadata {
                path: self.path.clone(),
                key: key.to_string(),
                value: value.clone(),
            }),
        }
    }

    /// Names of all tensors in the file, in no particular order.
    pub fn names(&self) -> Vec<String> {
        self.header.tensors().into_keys().collect()
    }

    /// Shape of tensor `name`, or a [`WorldError::MissingTensor`].
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.header
            .info(name)
            .map(|info| info.shape.as_slice())
            .ok_or_else(|| self.missing(name))
    }

    /// Whether the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// Copies out the F32 matrix `name`, which must have shape `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let data = self.f32_data(name, &[rows, cols])?;
        Ok(Array2::from_shape_vec((rows, cols), data).expect("length checked against the shape"))
    }

    /// Copies out the F32 vector `name`, which must have shape `[len]`.
    pub fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>> {
        Ok(Array1::from_vec(self.f32_data(name, &[len])?))
    }

    /// Copies out the F32 tensor `name` of any rank, which must have shape
    /// `shape`, in row-major order.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.f32_data(name, shape)
    }

    fn f32_data(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.header.info(name).ok_or_else(|| self.missing(name))?;
        if info.dtype != Dtype::F32 {
            return Err(WorldError::Dtype {
                path: self.path.clone(),
                name: name.to_string(),
                found: info.dtype.to_string(),
            });
        }
        if info.shape != expected {
            return Err(WorldError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
                why: "required by the world-model format".into(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &self.bytes[self.data_start + start..self.data_start + end];
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(WorldError::NonFinite {
                path: self.path.clone(),
                name: name.to_string(),
            });
        }
        Ok(values)
    }

    fn missing(&self, name: &str) -> WorldError {
        WorldError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        }
    }
}

/// Turns the safetensors crate's error into one that says what is wrong with
/// this particular file.
fn classify(path: &Path, bytes: &[u8], err: SafeTensorError) -> WorldError {
    let path = path.to_path_buf();
    match err {
        SafeTensorError::MetadataIncompleteBuffer => {
            let found = bytes.len();
            let expected = declared_len(bytes).unwrap_or(0);
            WorldError::Truncated {
                path,
                expected,
                found,
            }
        }
        SafeTensorError::HeaderTooSmall => WorldError::NotSafetensors {
            path,
            reason: format!("only {} bytes long", bytes.len()),
        },
        SafeTensorError::InvalidHeaderLength => WorldError::NotSafetensors {
            path,
            reason: format!(
                "its header length runs past the end of the {}-byte file: truncated or not a checkpoint",
                bytes.len()
            ),
        },
        other => WorldError::NotSafetensors {
            path,
            reason: other.to_string(),
        },
    }
}

/// The file size a well-formed header declares: header plus the end of the
/// furthest tensor. Only used to make the "truncated" message concrete.
fn declared_len(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..HEADER_LEN_BYTES)?.try_into().ok()?) as usize;
    let header = bytes.get(HEADER_LEN_BYTES..HEADER_LEN_BYTES.checked_add(n)?)?;
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    let data_end = json
        .as_object()?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0) as usize;
    Some(HEADER_LEN_BYTES + n + data_end)
}

/// An F32 tensor ready to be written: shape plus row-major little-endian bytes.
pub struct TensorData {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl TensorData {
    /// Builds a tensor; `values.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, values: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "tensor shape {shape:?} does not match {} values",
            values.len()
        );
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { shape, bytes }
    }
}

impl safetensors::View for &TensorData {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` (and `metadata` as `__metadata__`) to `path` atomically:
/// the safetensors crate writes a sibling temp file and renames it, so a
/// reader never sees a half-written checkpoint.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorData)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let views = tensors.iter().map(|(name, t)| (name.as_str(), t));
    let bytes =
        safetensors::serialize(views, metadata).map_err(|e| WorldError::NotSafetensors {
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {e}"),
        })?;
    // Replaced whole: a kill mid-write keeps the previous file.
    crate::atomic::replace(path, |out| out.write_all(&bytes)).map_err(|e| WorldError::io(path, e))
}
