//! The configuration checked against the model before any work: which
//! blocks, which layers with which grid.

use std::collections::BTreeSet;

use super::config::{BlockSelection, PipelineConfig};
use super::context::in_block;
use crate::backend::{LinearInfo, QuantizableModel};
use crate::config::QuantScheme;
use crate::error::{Error, Result};

/// One linear of a selected block and its grid (`None`: full precision).
pub(crate) struct PlannedLayer {
    pub(crate) info: LinearInfo,
    pub(crate) scheme: Option<QuantScheme>,
}

/// One block of the run.
pub(crate) struct PlannedBlock {
    pub(crate) name: String,
    /// `None` when the block is not selected (it only passes the streams through).
    pub(crate) groups: Option<Vec<Vec<PlannedLayer>>>,
}

/// The checked plan of a run.
pub(crate) struct RunPlan {
    pub(crate) blocks: Vec<PlannedBlock>,
    /// Layers that will be quantized.
    pub(crate) layers_total: usize,
}

impl RunPlan {
    /// Checks `cfg` against `model`: block indices in range, a block prefix
    /// that matches a block, override keys that name a layer (`"layer"` or
    /// `"block/layer"`), every block's layout (no empty group, no empty or
    /// repeated layer name), every selected group with one input width, and
    /// every grid valid for its layer's width.
    pub(crate) fn new<M: QuantizableModel + ?Sized>(
        model: &M,
        cfg: &PipelineConfig,
    ) -> Result<Self> {
        let nb = model.num_blocks();
        let names: Vec<String> = (0..nb).map(|b| model.block_name(b)).collect();
        match cfg.blocks() {
            BlockSelection::All => {}
            BlockSelection::Indices(v) => {
                let bad: Vec<String> = v
                    .iter()
                    .filter(|&&i| i >= nb)
                    .map(|i| i.to_string())
                    .collect();
                if !bad.is_empty() {
                    return Err(Error::UnknownNames {
                        what: "block indices",
                        names: bad,
                        known: if nb == 0 {
                            "none".into()
                        } else {
                            format!("0..={}", nb - 1)
                        },
                    });
                }
            }
            BlockSelection::NamePrefix(p) => {
                if !names.iter().any(|n| n.starts_with(p.as_str())) {
                    return Err(Error::UnknownNames {
                        what: "block name prefixes",
                        names: vec![p.clone()],
                        known: summarize(names.iter().cloned()),
                    });
                }
            }
        }
        let mut used_keys = BTreeSet::new();
        let mut all_layers = BTreeSet::new();
        let mut blocks = Vec::with_capacity(nb);
        let mut layers_total = 0;
        for (b, name) in names.into_iter().enumerate() {
            let groups = model.linear_groups(b);
            check_layout(b, &name, &groups)?;
            for group in &groups {
                for l in group {
                    all_layers.insert(l.name.clone());
                    let specific = format!("{name}/{}", l.name);
                    if cfg.layer_overrides().contains_key(&specific) {
                        used_keys.insert(specific);
                    }
                    if cfg.layer_overrides().contains_key(&l.name) {
                        used_keys.insert(l.name.clone());
                    }
                }
            }
            let selected = cfg.blocks().contains(b, &name);
            let planned = if selected {
                let mut out = Vec::with_capacity(groups.len());
                for group in groups {
                    check_group(b, &name, &group)?;
                    let mut layers = Vec::with_capacity(group.len());
                    for info in group {
                        let scheme = cfg.scheme_for(&name, &info.name);
                        if let Some(s) = &scheme {
                            s.group_size()
                                .columns_for(info.in_features)
                                .map_err(in_block(b, &name, Some(&info.name), None))?;
                            layers_total += 1;
                        }
                        layers.push(PlannedLayer { info, scheme });
                    }
                    out.push(layers);
                }
                Some(out)
            } else {
                None
            };
            blocks.push(PlannedBlock {
                name,
                groups: planned,
            });
        }
        let unknown: Vec<String> = cfg
            .layer_overrides()
            .keys()
            .filter(|k| !used_keys.contains(*k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(Error::UnknownNames {
                what: "layer override keys",
                names: unknown,
                known: format!(
                    "layer names {} (or \"block name/layer name\")",
                    summarize(all_layers.into_iter())
                ),
            });
        }
        Ok(RunPlan {
            blocks,
            layers_total,
        })
    }
}

/// What `linear_groups` returns for any block (selected or not, since the
/// importance pass walks every block): no empty group, no empty layer name,
/// no layer name listed twice in the block.
fn check_layout(b: usize, name: &str, groups: &[Vec<LinearInfo>]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (k, group) in groups.iter().enumerate() {
        if group.is_empty() {
            return Err(in_block(b, name, None, None)(Error::Backend {
                block: b,
                layer: None,
                reason: format!("linear_groups lists an empty group (group {k})"),
            }));
        }
        for l in group {
            let problem = if l.name.is_empty() {
                Some("linear_groups lists a layer with an empty name")
            } else if !seen.insert(l.name.as_str()) {
                Some("linear_groups lists this layer name twice in one block")
            } else {
                None
            };
            if let Some(reason) = problem {
                return Err(in_block(b, name, Some(&l.name), None)(Error::Backend {
                    block: b,
                    layer: Some(l.name.clone()),
                    reason: reason.into(),
                }));
            }
        }
    }
    Ok(())
}

/// A group the pipeline can capture: one input width (non-empty: see
/// [`check_layout`]).
fn check_group(b: usize, name: &str, group: &[LinearInfo]) -> Result<()> {
    let Some(first) = group.first() else {
        return Ok(());
    };
    for l in group {
        if l.in_features != first.in_features {
            return Err(in_block(b, name, Some(&l.name), None)(Error::shape(
                format!("input width of a linear grouped with {}", first.name),
                &[first.in_features],
                &[l.in_features],
            )));
        }
    }
    Ok(())
}

/// At most 12 names, comma separated, then a count.
fn summarize(names: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = names.collect();
    let shown = all.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 12 {
        format!("{shown}, ... ({} in all)", all.len())
    } else if all.is_empty() {
        "none".into()
    } else {
        shown
    }
}
