//! Models on disk: a scan of the model directories, giving the [`Catalog`] the worker
//! advertises in `skills`.
//!
//! Two layouts are read, in any of the directories and at any depth below them:
//!
//! - The existing worker's (LM Studio's): a directory is a model when it holds `config.json`
//!   and weights (`model.safetensors`, `model-*`, `*.safetensors` or `pytorch_model.bin`); its
//!   id is the last two components of its path (`<root>/org/name` → `org/name`), and its size
//!   the bytes of its regular files (links count nothing).
//! - The Hugging Face cache's (`hub`): a repository `models--{org}--{name}` is the model
//!   `org/name`, served from one of its snapshots, whose files are links into the
//!   repository's `blobs/` (see `hub`).
//!
//! Model directories are not descended into, and symbolic links to directories are not
//! followed. The directories are scanned in order, and the first to give an id serves it: a
//! later model with the same id is skipped with a warning naming both. A missing directory
//! holds no models; an unreadable one is an error. The walk is bounded in depth and, over all
//! the directories together, in entries, and a model's parameter count is estimated from its
//! `config.json` (`plan::model_size::parameters_from_config`).
//!
//! It reads the file system only: loading a model is the engine's (`engine::mlx`), and the
//! catalog's shapes ([`Catalog`], [`ModelEntry`]) belong to the engine seam.

mod hub;
#[cfg(test)]
mod tests;

use std::collections::btree_map::Entry;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tracing::warn;

use crate::engine::{Catalog, ModelEntry};
use crate::plan::model_size::{ModelFacts, parameters_from_config};

/// Deepest directory level the scan descends to below the root.
const SCAN_DEPTH_MAX: usize = 8;
/// Most directory entries the scan looks at.
const SCAN_ENTRIES_MAX: usize = 100_000;
/// Largest `config.json` read.
const MODEL_CONFIG_BYTES_MAX: u64 = 1024 * 1024;

impl ModelEntry {
    /// What is known of the size of this entry, the model `id`, for its tier.
    pub fn facts<'a>(&self, id: &'a str) -> ModelFacts<'a> {
        ModelFacts {
            parameter_count: self.parameter_count,
            name: id,
            disk_bytes: Some(self.size_bytes),
        }
    }
}

/// Why the model directory could not be scanned.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root could not be read.
    #[error("cannot read model directory {path}: {source}")]
    Root {
        /// The root.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Scans `roots`, in order. A missing root holds no models (as for the existing worker); an
/// unreadable one is an error. Unreadable subdirectories are skipped with a warning, and so
/// is a model whose id an earlier one has.
pub fn scan(roots: &[PathBuf]) -> Result<Catalog, ScanError> {
    let mut catalog = Catalog::default();
    let mut budget = Budget::new();
    let mut scanned: Vec<PathBuf> = Vec::new();
    for root in roots {
        if let Ok(resolved) = root.canonicalize() {
            if scanned.contains(&resolved) {
                warn!(dir = %root.display(), "model directory listed twice; scanned once");
                continue;
            }
            scanned.push(resolved);
        }
        scan_root(root, &mut catalog, &mut budget)?;
        if budget.spent() {
            break;
        }
    }
    Ok(catalog)
}

/// Adds the models below `root` that `catalog` does not hold yet.
fn scan_root(root: &Path, catalog: &mut Catalog, budget: &mut Budget) -> Result<(), ScanError> {
    match fs::symlink_metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            warn!(dir = %root.display(), "model directory does not exist; it holds no models");
            return Ok(());
        }
        Err(source) => {
            return Err(ScanError::Root {
                path: root.to_owned(),
                source,
            });
        }
        Ok(_) => {}
    }
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        match hub::repo(&dir) {
            Some(hub::Repo::Model(id)) => {
                if let Some(snapshot) = hub::model(&dir, budget) {
                    let entry = ModelEntry {
                        path: snapshot.dir.clone(),
                        size_bytes: snapshot.size_bytes(),
                        parameter_count: parameter_count(&snapshot.config),
                        streams_max: None,
                    };
                    add(catalog, id, entry);
                }
                continue;
            }
            Some(hub::Repo::Other) => continue,
            None => {}
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(source) if dir == root => {
                return Err(ScanError::Root {
                    path: root.to_owned(),
                    source,
                });
            }
            Err(e) => {
                warn!(dir = %dir.display(), cause = %e, "model scan skips an unreadable directory");
                continue;
            }
        };
        let mut names = Vec::new();
        let mut subdirs = Vec::new();
        for entry in entries.flatten() {
            if !budget.take() {
                return Ok(());
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            // file_type() does not follow links: linked directories are not walked.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                subdirs.push(entry.path());
            }
            names.push(name);
        }
        if is_model(&names) {
            let entry = ModelEntry {
                path: dir.clone(),
                size_bytes: dir_size(&dir, budget),
                parameter_count: parameter_count(&dir.join("config.json")),
                streams_max: None,
            };
            add(catalog, model_id(&dir), entry);
            continue;
        }
        if depth < SCAN_DEPTH_MAX {
            subdirs.sort();
            stack.extend(subdirs.into_iter().rev().map(|d| (d, depth + 1)));
        }
    }
    Ok(())
}

/// Adds the model `id` at `entry` unless `catalog` has a model of that id already.
fn add(catalog: &mut Catalog, id: String, entry: ModelEntry) {
    match catalog.models.entry(id) {
        Entry::Vacant(vacant) => {
            vacant.insert(entry);
        }
        Entry::Occupied(served) => warn!(
            model = %served.key(),
            served = %served.get().path.display(),
            skipped = %entry.path.display(),
            "two model directories give one id; the first is served"
        ),
    }
}

/// The directory entries a scan may still look at, over all its roots.
struct Budget {
    /// Entries left.
    left: usize,
    /// Whether an entry was refused: the scan has stopped.
    refused: bool,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            left: SCAN_ENTRIES_MAX,
            refused: false,
        }
    }

    /// Counts one entry; `false` when none is left, and the scan stops (warned once).
    fn take(&mut self) -> bool {
        if self.left > 0 {
            self.left -= 1;
            return true;
        }
        if !self.refused {
            warn!(
                limit = SCAN_ENTRIES_MAX,
                "model scan stopped at its entry limit"
            );
            self.refused = true;
        }
        false
    }

    /// Whether the scan has stopped at its limit.
    fn spent(&self) -> bool {
        self.refused
    }
}

fn is_model(names: &[String]) -> bool {
    names.iter().any(|n| n == "config.json")
        && names.iter().any(|n| {
            n == "model.safetensors"
                || n.starts_with("model-")
                || n.ends_with(".safetensors")
                || n == "pytorch_model.bin"
        })
}

/// The last two components of `dir`, joined by `/`.
fn model_id(dir: &Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let start = parts.len().saturating_sub(2);
    parts[start..].join("/")
}

/// Bytes of the regular files below `dir` (links count nothing), within the scan's budget.
fn dir_size(dir: &Path, budget: &mut Budget) -> u64 {
    let mut total = 0;
    walk(dir, budget, |_, entry, kind| {
        if kind.is_file() {
            total += entry.metadata().map_or(0, |m| m.len());
        }
    });
    total
}

/// Hands `visit` every entry below `dir` that is no directory (files and links, each with
/// the directory holding it), descending into directories but not into links to them, within
/// the scan's budget; `false` when the budget ran out first. Unreadable directories are passed
/// over.
fn walk(
    dir: &Path,
    budget: &mut Budget,
    mut visit: impl FnMut(&Path, &fs::DirEntry, fs::FileType),
) -> bool {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if !budget.take() {
                return false;
            }
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(kind) => visit(&d, &entry, kind),
                Err(_) => {}
            }
        }
    }
    true
}

/// Parameters of a transformer described by `config.json`, when its dimensions are given.
pub fn parameter_count(config_path: &Path) -> Option<u64> {
    let meta = fs::metadata(config_path).ok()?;
    if meta.len() > MODEL_CONFIG_BYTES_MAX {
        return None;
    }
    let value: Value = serde_json::from_slice(&fs::read(config_path).ok()?).ok()?;
    parameters_from_config(&value)
}
