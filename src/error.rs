//! The crate's one error type.
//!
//! Every message names what is at fault: the file, the tensor, the expected
//! and found shape, or the latent id. The CLI prints the message on one line
//! and exits with code 2.

use std::path::Path;

/// Convenient alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading, editing or writing SAEs.
///
/// New variants may be added: a `match` needs a catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor the format requires is not in the file.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// The tensor's name as stored on disk.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape that was required.
        expected: Vec<usize>,
        /// The shape that was found.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this crate cannot use.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The dtype, as the file spells it.
        dtype: String,
    },
    /// A file is not a valid instance of its format (truncated, corrupted, inconsistent).
    #[error("invalid {format} data: {msg}")]
    Format {
        /// The format, e.g. `safetensors`, `npy`, `pickle`, `json`.
        format: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The SAE configuration is invalid or inconsistent.
    #[error("invalid SAE config: {0}")]
    Config(String),
    /// A model's configuration (GGUF metadata or `config.json`) is invalid: the message
    /// names the key at fault.
    #[error("invalid model config: {0}")]
    ModelConfig(String),
    /// A model architecture this crate does not run.
    #[error("unsupported model architecture `{arch}` (supported: {supported})")]
    UnsupportedModel {
        /// The architecture as the file names it.
        arch: String,
        /// The architectures this crate runs.
        supported: String,
    },
    /// A latent id is not below `d_sae`.
    #[error("latent id {id} out of range: the SAE has d_sae = {d_sae}")]
    LatentOutOfRange {
        /// The offending id.
        id: u64,
        /// The SAE's dictionary size.
        d_sae: usize,
    },
    /// The same latent was given two edits.
    #[error("latent id {0} is given more than one edit")]
    DuplicateLatent(u32),
    /// The input's last dimension does not match the SAE.
    #[error("input has shape {shape:?}: its last dimension must equal the SAE's d_in = {d_in}")]
    InputDim {
        /// The input's shape.
        shape: Vec<usize>,
        /// The SAE's input width.
        d_in: usize,
    },
    /// A name given for a setting (a dtype, a weight format, positions, a splice mode, a
    /// preset…) is not one this crate knows.
    #[error("unknown {what} `{got}` (expected {expected})")]
    UnknownName {
        /// The setting, e.g. `dtype` or `--weights`.
        what: String,
        /// The name given.
        got: String,
        /// The names (or the form) accepted.
        expected: String,
    },
    /// A token sequence does not fit in the model's context.
    #[error("{what}: {tokens} tokens exceed the model's context length of {max} tokens")]
    ContextLength {
        /// The sequence, e.g. `prompt of 12 tokens + 64 new tokens`.
        what: String,
        /// Its length in tokens (cached positions included).
        tokens: usize,
        /// The model's context length.
        max: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {id} out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// An SAE's input width does not match the activation it is applied to.
    #[error("{what}: the SAE has d_in = {d_in} but the activation has width {width}")]
    WidthMismatch {
        /// Where: the SAE file, the hook point or the call.
        what: String,
        /// The SAE's input width.
        d_in: usize,
        /// The activation's (the model's) width.
        width: usize,
    },
    /// An input that must hold at least one item holds none.
    #[error("{what} is empty")]
    Empty {
        /// The input, e.g. `the prompt` or `token batch of shape [0, 4]`.
        what: String,
    },
    /// A file's (or extracted text's) SHA-256 is not the one expected.
    #[error("{what}: sha256 {got}, expected {want}")]
    Checksum {
        /// The file or text at fault (and what to do about it).
        what: String,
        /// The hash found.
        got: String,
        /// The hash expected.
        want: String,
    },
    /// A device or compute backend cannot be used on this machine or in this build.
    #[error("{backend}: {why}")]
    Unavailable {
        /// The backend, e.g. `cuda`.
        backend: String,
        /// Why, and how to make it available.
        why: String,
    },
    /// An argument that is not valid for the call (the rare cases without a variant of
    /// their own).
    #[error("{0}")]
    Invalid(String),
    /// The format of a path could not be recognised.
    #[error("{path}: not a recognised SAE release ({why})")]
    UnknownFormat {
        /// The path given.
        path: String,
        /// What was looked for.
        why: String,
    },
    /// An error inside a named file: wraps the cause with the path.
    #[error("{path}: {source}")]
    InFile {
        /// The file at fault.
        path: String,
        /// The cause.
        source: Box<Error>,
    },
    /// An error from candle (its backtrace, if any, is dropped: messages stay one line).
    #[error("{0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Candle(e)
    }
}

impl Error {
    /// Attach a file path to this error (idempotent: an error that already names a file keeps it).
    pub fn in_file(self, path: impl AsRef<Path>) -> Self {
        match self {
            e @ (Error::InFile { .. } | Error::Io { .. } | Error::UnknownFormat { .. }) => e,
            e => Error::InFile {
                path: path.as_ref().display().to_string(),
                source: Box::new(e),
            },
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// A format error whose cause is a candle error (e.g. a GGUF header candle rejected);
    /// candle's backtrace is dropped so the message stays one line.
    pub fn format_candle(format: &'static str, e: candle_core::Error) -> Self {
        Error::format(format, Error::from(e).to_string())
    }

    /// An [`Error::UnknownName`]: `got` is not one of the names `expected` of `what`.
    pub fn unknown_name(
        what: impl Into<String>,
        got: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Error::UnknownName {
            what: what.into(),
            got: got.into(),
            expected: expected.into(),
        }
    }

    /// Name the setting an [`Error::UnknownName`] is about (e.g. `model_dtype` for a
    /// dtype read from a config file); any other error is returned unchanged.
    pub fn for_setting(self, setting: impl Into<String>) -> Self {
        match self {
            Error::UnknownName { got, expected, .. } => Error::UnknownName {
                what: setting.into(),
                got,
                expected,
            },
            e => e,
        }
    }

    /// An [`Error::Empty`] naming `what`.
    pub fn empty(what: impl Into<String>) -> Self {
        Error::Empty { what: what.into() }
    }

    /// A format error.
    pub fn format(format: &'static str, msg: impl Into<String>) -> Self {
        Error::Format {
            format,
            msg: msg.into(),
        }
    }
}
