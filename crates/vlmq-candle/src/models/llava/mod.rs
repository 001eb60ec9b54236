//! LLaVA: a CLIP vision tower, a GELU projector and a Llama-family language
//! model, with its calibration sample and hidden state.

pub(crate) mod model;
pub(crate) mod sample;
