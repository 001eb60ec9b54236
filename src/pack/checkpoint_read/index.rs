//! The checks made when a checkpoint is opened: every quantized layer's
//! tensors present, with dtypes and shapes that agree with each other and
//! with the config; every other tensor a passthrough.

use std::collections::BTreeMap;

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use crate::config::Bits;
use crate::error::{Error, Result};
use crate::pack::bits::{values_for, words_for};

use super::{corrupt, Checkpoint};

/// Shape facts of one quantized layer, checked when the checkpoint is opened.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerShape {
    pub(super) out: usize,
    pub(super) inp: usize,
    pub(super) groups: usize,
    pub(super) has_g_idx: bool,
}

impl Checkpoint {
    /// Checks every layer and sorts the tensors into layers and passthroughs.
    pub(super) fn index_layers(&mut self) -> Result<()> {
        let bits = self.config.bits;
        let b = bits.get() as usize;
        let mut layers = BTreeMap::new();
        let names: Vec<String> = self.meta.tensors().into_keys().collect();
        for n in &names {
            if let Some(prefix) = n.strip_suffix(".qweight") {
                let s = self.check_layer(prefix, bits, b)?;
                layers.insert(prefix.to_string(), s);
            }
        }
        for n in &names {
            if let Some(prefix) = n.strip_suffix(".qzeros") {
                if !layers.contains_key(prefix) {
                    return Err(corrupt(
                        &self.path,
                        format!("{n:?} has no matching {prefix}.qweight"),
                    ));
                }
            }
        }
        self.layers = layers;
        let mut passthrough: Vec<String> = names
            .into_iter()
            .filter(|n| self.owning_layer(n).is_none())
            .collect();
        passthrough.sort();
        self.passthrough = passthrough;
        Ok(())
    }

    fn expect(&self, name: &str, dtypes: &[Dtype], shape: Option<&[usize]>) -> Result<&TensorInfo> {
        let info = self.info(name)?;
        if !dtypes.contains(&info.dtype) {
            return Err(Error::DtypeMismatch {
                name: name.into(),
                expected: format!("{dtypes:?}"),
                actual: format!("{:?}", info.dtype),
            });
        }
        if let Some(s) = shape {
            if info.shape != s {
                return Err(Error::shape(name, s, &info.shape));
            }
        }
        Ok(info)
    }

    fn check_layer(&self, name: &str, bits: Bits, b: usize) -> Result<LayerShape> {
        let qw = self.expect(&format!("{name}.qweight"), &[Dtype::I32], None)?;
        let [rows, out] = qw.shape[..] else {
            return Err(corrupt(
                &self.path,
                format!("{name}.qweight must be 2-D, has shape {:?}", qw.shape),
            ));
        };
        let inp = values_for(rows, bits).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("{name}.qweight has {rows} rows, not a whole number of {b}-bit inputs"),
            )
        })?;
        let zcols = words_for(out, bits).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("{name}: {out} outputs at {b} bits do not fill whole qzeros words"),
            )
        })?;
        if inp == 0 || out == 0 {
            return Err(corrupt(&self.path, format!("{name}.qweight is empty")));
        }
        let groups = self.config.group_size.groups_for(inp)?;
        self.expect(
            &format!("{name}.qzeros"),
            &[Dtype::I32],
            Some(&[groups, zcols]),
        )?;
        self.expect(
            &format!("{name}.scales"),
            &[Dtype::F16],
            Some(&[groups, out]),
        )?;
        let has_g_idx = self.meta.info(&format!("{name}.g_idx")).is_some();
        if has_g_idx {
            self.expect(&format!("{name}.g_idx"), &[Dtype::I32], Some(&[inp]))?;
        } else if self.config.desc_act {
            return Err(Error::MissingTensor {
                name: format!("{name}.g_idx"),
            });
        }
        if self.meta.info(&format!("{name}.bias")).is_some() {
            self.expect(
                &format!("{name}.bias"),
                &[Dtype::F16, Dtype::BF16, Dtype::F32],
                Some(&[out]),
            )?;
        }
        Ok(LayerShape {
            out,
            inp,
            groups,
            has_g_idx,
        })
    }
}
