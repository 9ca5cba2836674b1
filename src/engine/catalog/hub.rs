//! The Hugging Face cache's layout, as `huggingface-cli download`, `huggingface_hub` and
//! `mlx_lm` leave it (`~/.cache/huggingface/hub`): one directory per repository,
//! `models--{org}--{name}` (`models--{name}` for a repository without an organisation), holding
//! `blobs/` (the files, named by their hash), `refs/main` (the commit the `main` branch was at
//! when downloaded) and `snapshots/{commit}/` (each revision's file names, symbolic links into
//! `blobs/`, usually relative: `../../blobs/{hash}`).
//!
//! A repository's model is its `main` snapshot, else (no `refs/main`, or it names no complete
//! snapshot) its most recently modified complete one. A snapshot's files are the links that
//! resolve to regular files inside the repository's own directory, and its regular files; a
//! link out of it, a dangling or looping one, and one to a partial download (`*.incomplete`)
//! are none of its files. Its size counts each file it reaches once, however many names lead
//! to it. Datasets and spaces (`datasets--*`, `spaces--*`) hold no models.
//!
//! It reads the file system only, within the scan's entry budget; the scan (`catalog`) decides
//! where repositories are and what makes a model.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use tracing::warn;

use super::{Budget, is_model, walk};

/// Largest `refs/main` read: a commit hash is 40 (SHA-1) or 64 (SHA-256) characters.
const REF_BYTES_MAX: u64 = 256;

/// What a cache repository directory holds, by its name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Repo {
    /// A model repository, with the id clients send (`org/name`, or `name`).
    Model(String),
    /// A dataset or a space: no model.
    Other,
}

/// The kind of cache repository `dir` is, when its name has the cache's shape and it holds
/// `snapshots/`; `None` for any other directory. A model repository whose name gives no id
/// (`models--org--`) is warned of and is no model: walked as a plain directory, its snapshots'
/// links would look like a model named `snapshots/{commit}` of no size.
pub(super) fn repo(dir: &Path) -> Option<Repo> {
    let name = dir.file_name()?.to_str()?;
    let model = name.strip_prefix("models--");
    let other = name.starts_with("datasets--") || name.starts_with("spaces--");
    if model.is_none() && !other {
        return None;
    }
    let snapshots = fs::symlink_metadata(dir.join("snapshots")).ok()?;
    if !snapshots.is_dir() {
        return None;
    }
    let Some(rest) = model else {
        return Some(Repo::Other);
    };
    // Repository names never hold `--`, so the first one ends the organisation.
    let id = match rest.split_once("--") {
        Some((org, name)) => format!("{org}/{name}"),
        None => rest.to_owned(),
    };
    let plain = id
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != "..");
    if !plain {
        warn!(repo = %dir.display(), "cache repository's name gives no model id; not served");
        return Some(Repo::Other);
    }
    Some(Repo::Model(id))
}

/// The snapshot of the repository at `repo` that is its model, with the files it reaches
/// (resolved).
#[derive(Debug)]
pub(super) struct Snapshot {
    /// `{repo}/snapshots/{commit}`, as the scan reached it.
    pub(super) dir: PathBuf,
    /// Its `config.json`, resolved.
    pub(super) config: PathBuf,
    /// Every file it reaches, resolved, each once.
    pub(super) files: BTreeSet<PathBuf>,
}

impl Snapshot {
    /// Bytes of the files it reaches.
    pub(super) fn size_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// The model of the repository at `repo`: the snapshot `refs/main` names, else the most
/// recently modified complete one; `None` when no snapshot is a complete model.
pub(super) fn model(repo: &Path, budget: &mut Budget) -> Option<Snapshot> {
    let home = match repo.canonicalize() {
        Ok(home) => home,
        Err(e) => {
            warn!(repo = %repo.display(), cause = %e, "model scan skips an unreadable cache repository");
            return None;
        }
    };
    let snapshots = snapshot_dirs(repo, budget);
    let main = main_revision(repo);
    let main_dir = main.as_ref().ok().and_then(|rev| {
        snapshots
            .iter()
            .find(|d| d.file_name() == Some(OsStr::new(rev)))
    });
    if let Some(dir) = main_dir
        && let Some(snapshot) = complete(dir, &home, budget)
    {
        return Some(snapshot);
    }
    let newest = snapshots
        .iter()
        .filter(|d| Some(*d) != main_dir)
        .filter_map(|d| complete(d, &home, budget))
        .max_by_key(|s| modified(&s.dir));
    if budget.spent() {
        return None;
    }
    let reason = match (&main, main_dir) {
        (Err(reason), _) => reason.clone(),
        (Ok(rev), None) => format!("refs/main names {rev}, which has no snapshot"),
        (Ok(rev), Some(_)) => format!("the snapshot refs/main names, {rev}, is incomplete"),
    };
    match &newest {
        Some(s) => warn!(
            repo = %repo.display(),
            reason,
            serving = %s.dir.display(),
            "cache repository served at its newest complete snapshot"
        ),
        None => warn!(
            repo = %repo.display(),
            reason,
            "cache repository has no complete snapshot; not served"
        ),
    }
    newest
}

/// The revision `{repo}/refs/main` names: one plain name, read within [`REF_BYTES_MAX`];
/// the error says why there is none.
fn main_revision(repo: &Path) -> Result<String, String> {
    let path = repo.join("refs/main");
    let read = || -> io::Result<Option<String>> {
        // A link could lead anywhere; the cache writes a plain file.
        if !fs::symlink_metadata(&path)?.is_file() {
            return Ok(None);
        }
        let mut text = String::new();
        fs::File::open(&path)?
            .take(REF_BYTES_MAX + 1)
            .read_to_string(&mut text)?;
        Ok((text.len() as u64 <= REF_BYTES_MAX).then_some(text))
    };
    let text = match read() {
        Ok(Some(text)) => text,
        Ok(None) => {
            return Err(format!(
                "refs/main is not a file of at most {REF_BYTES_MAX} bytes"
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("no refs/main".to_owned()),
        Err(e) => return Err(format!("cannot read refs/main: {e}")),
    };
    let rev = text.trim();
    let mut parts = Path::new(rev).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) if !rev.contains('/') => Ok(rev.to_owned()),
        _ => Err(format!("refs/main holds {rev:?}, not a revision")),
    }
}

/// The directories in `{repo}/snapshots` (links to directories are none), in name order.
fn snapshot_dirs(repo: &Path, budget: &mut Budget) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(repo.join("snapshots")) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        if !budget.take() {
            break;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    dirs
}

/// The snapshot at `dir` when it is a complete model: its own names that reach files of the
/// repository (`home`, resolved) are a model's.
fn complete(dir: &Path, home: &Path, budget: &mut Budget) -> Option<Snapshot> {
    let mut names = Vec::new();
    let mut config = None;
    let mut files = BTreeSet::new();
    let whole = walk(dir, budget, |parent, entry, _| {
        let Some(file) = file_of(&entry.path(), home) else {
            return;
        };
        if parent == dir {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "config.json" {
                config = Some(file.clone());
            }
            names.push(name);
        }
        files.insert(file);
    });
    if !whole || !is_model(&names) {
        return None;
    }
    Some(Snapshot {
        dir: dir.to_owned(),
        config: config?,
        files,
    })
}

/// The file `path` reaches, resolved, when it is a regular file inside `home` and no partial
/// download; a link that leads elsewhere is warned of.
fn file_of(path: &Path, home: &Path) -> Option<PathBuf> {
    let skip = |why: &str| {
        warn!(path = %path.display(), why, "model scan ignores a file of a cache snapshot");
        None
    };
    let resolved = match path.canonicalize() {
        Ok(resolved) => resolved,
        Err(e) => return skip(&format!("it does not resolve: {e}")),
    };
    if !resolved.starts_with(home) {
        return skip("it leads out of its repository");
    }
    if resolved.extension().is_some_and(|e| e == "incomplete") {
        return skip("it leads to a partial download");
    }
    match fs::metadata(&resolved) {
        Ok(m) if m.is_file() => Some(resolved),
        Ok(_) => skip("it leads to no regular file"),
        Err(e) => skip(&format!("it does not resolve: {e}")),
    }
}

/// When `dir` was last modified; the epoch when unknown.
fn modified(dir: &Path) -> SystemTime {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
