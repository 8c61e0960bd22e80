//! The emulated accelerator's arithmetic: runs the shipped U-Nets (fp32 and bit-exact
//! int8, `docs/models.md`) from a parameter blob as it sits in accelerator memory, with
//! optional datapath upsets, and re-runs faulty parameter sets fast by reusing each
//! input's golden activations (`docs/datapath.md`).

mod engine;
mod exec;
pub mod fp32;
pub mod int8;
mod model;
pub mod requant;

pub use engine::{Engine, EngineStats};
pub use model::{Model, Precision};

/// A datapath upset (timing fault under undervolting): flip `bit` of element `element`
/// of node `node`'s output (the i32 accumulator domain is not kept, so it is the stored
/// f32/i8 output element).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upset {
    pub node: usize,
    pub element: usize,
    pub bit: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Files(#[from] proto::model_files::ModelFileError),
    #[error("manifest not runnable: {0}")]
    Manifest(String),
    #[error("parameter blob is {got} bytes, the manifest's params_bytes is {want}")]
    ParamsSize { got: usize, want: usize },
    #[error("input is {got} bytes, the model's input needs {want}")]
    InputSize { got: usize, want: usize },
    #[error("upset {upset:?}: {reason}")]
    BadUpset { upset: Upset, reason: String },
}
