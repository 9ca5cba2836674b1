// Goal: the scan finds exactly the directories that are models, names them as clients do, and
// sums their sizes.
// Method: model trees built in a temporary directory.

use super::*;

/// The catalog of the one model directory `root`.
fn scanned(root: &Path) -> Catalog {
    scan(&[root.to_owned()]).unwrap()
}

fn touch(path: &Path, bytes: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![b'x'; bytes]).unwrap();
}

/// A model in the existing worker's layout at `dir`: a 1-byte `config.json` and weights.
fn plain_model(dir: &Path, weights: usize) {
    touch(&dir.join("config.json"), 1);
    touch(&dir.join("model.safetensors"), weights);
}

#[test]
fn models_are_found_and_named_by_their_last_two_components() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    touch(&root.join("org/a/config.json"), 10);
    touch(&root.join("org/a/model.safetensors"), 100);
    touch(&root.join("org/b/config.json"), 10);
    touch(&root.join("org/b/model-00001-of-00002.safetensors"), 5);
    touch(&root.join("flat/config.json"), 1);
    touch(&root.join("flat/pytorch_model.bin"), 1);
    // Not models: no weights, or weights without config.
    touch(&root.join("org/c/config.json"), 1);
    touch(&root.join("org/d/weights.safetensors"), 1);
    // A nested directory inside a model is not a second model.
    touch(&root.join("org/a/sub/config.json"), 1);
    touch(&root.join("org/a/sub/model.safetensors"), 1);
    let catalog = scanned(&root);
    let ids: Vec<&str> = catalog.models.keys().map(String::as_str).collect();
    assert_eq!(ids, ["model/flat", "org/a", "org/b"]);
    assert_eq!(catalog.models["org/a"].size_bytes, 112);
    assert_eq!(catalog.total_size_bytes(), 112 + 15 + 2);
}

#[test]
fn a_missing_root_is_an_empty_catalog() {
    assert!(scanned(Path::new("/nonexistent/models")).models.is_empty());
}

// The Hugging Face cache, as `huggingface-cli download` and `mlx_lm` leave it:
// `models--{org}--{name}/{blobs,refs,snapshots}`, the snapshot's files relative symbolic links
// into `blobs/`.

/// A repository of the cache below `root`, for `models--{org}--{name}` (`name` alone when
/// `org` is empty).
struct HubRepo {
    dir: PathBuf,
}

impl HubRepo {
    fn new(root: &Path, kind: &str, org: &str, name: &str) -> HubRepo {
        let dir_name = if org.is_empty() {
            format!("{kind}--{name}")
        } else {
            format!("{kind}--{org}--{name}")
        };
        let dir = root.join(dir_name);
        fs::create_dir_all(dir.join("blobs")).unwrap();
        fs::create_dir_all(dir.join("snapshots")).unwrap();
        HubRepo { dir }
    }

    fn model(root: &Path, org: &str, name: &str) -> HubRepo {
        HubRepo::new(root, "models", org, name)
    }

    /// A blob of `bytes` bytes.
    fn blob(&self, sha: &str, bytes: usize) {
        touch(&self.dir.join("blobs").join(sha), bytes);
    }

    /// `snapshots/{rev}/{name}` as the cache writes it: a relative link to `blobs/{sha}`.
    fn link(&self, rev: &str, name: &str, sha: &str) {
        let depth = name.matches('/').count();
        let target = format!("{}../../blobs/{sha}", "../".repeat(depth));
        self.link_to(rev, name, Path::new(&target));
    }

    /// `snapshots/{rev}/{name}`, a link to `target` as given.
    fn link_to(&self, rev: &str, name: &str, target: &Path) {
        let path = self.dir.join("snapshots").join(rev).join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
    }

    fn refs_main(&self, text: &str) {
        touch(&self.dir.join("refs/main"), 0);
        fs::write(self.dir.join("refs/main"), text).unwrap();
    }

    /// A complete snapshot `rev`: `config.json` (10 bytes) and weights (`weights` bytes), each
    /// from a blob of its own.
    fn snapshot(&self, rev: &str, weights: usize) {
        self.blob(&format!("{rev}-config"), 10);
        self.blob(&format!("{rev}-weights"), weights);
        self.link(rev, "config.json", &format!("{rev}-config"));
        self.link(rev, "model.safetensors", &format!("{rev}-weights"));
    }

    fn snapshot_dir(&self, rev: &str) -> PathBuf {
        self.dir.join("snapshots").join(rev)
    }
}

/// The ids of `catalog`, in order.
fn ids(catalog: &Catalog) -> Vec<&str> {
    catalog.models.keys().map(String::as_str).collect()
}

#[test]
fn a_hugging_face_repo_is_its_org_and_name_at_the_revision_refs_main_names() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    let repo = HubRepo::model(&hub, "mlx-community", "Llama-3.2-1B-Instruct-4bit");
    repo.snapshot("0ld", 1000);
    let rev = "5f0c4d0b9a6e7f1d2c3b4a5968778695a4b3c2d1";
    repo.refs_main(&format!("{rev}\n"));
    repo.blob("cfg", 10);
    repo.blob("w1", 100);
    repo.blob("w2", 200);
    repo.blob("tok", 7);
    repo.link(rev, "config.json", "cfg");
    repo.link(rev, "model-00001-of-00002.safetensors", "w1");
    repo.link(rev, "model-00002-of-00002.safetensors", "w2");
    // Two names of one blob count it once; a file in a subdirectory counts.
    repo.link(rev, "tokenizer.json", "tok");
    repo.link(rev, "original/tokenizer.json", "tok");
    repo.blob("orig", 3);
    repo.link(rev, "original/params.json", "orig");
    // The old revision shares a blob with the new one: the cache keeps each blob once.
    repo.link("0ld", "tokenizer.json", "tok");

    let catalog = scanned(&hub);
    assert_eq!(ids(&catalog), ["mlx-community/Llama-3.2-1B-Instruct-4bit"]);
    let entry = &catalog.models["mlx-community/Llama-3.2-1B-Instruct-4bit"];
    assert_eq!(entry.path, repo.snapshot_dir(rev));
    assert_eq!(entry.size_bytes, 10 + 100 + 200 + 7 + 3);
}

#[test]
fn a_repo_without_an_org_is_named_by_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let repo = HubRepo::model(dir.path(), "", "gpt2");
    repo.snapshot("r1", 50);
    repo.refs_main("r1");
    let catalog = scanned(dir.path());
    assert_eq!(ids(&catalog), ["gpt2"]);
    assert_eq!(catalog.models["gpt2"].size_bytes, 60);
}

#[test]
fn links_out_of_the_repo_dangling_or_looping_are_not_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    touch(&dir.path().join("outside.safetensors"), 5000);
    let repo = HubRepo::model(&hub, "org", "m");
    repo.snapshot("r", 100);
    repo.refs_main("r");
    // Out of the repo: relative and absolute, to a file and into another repo's blobs.
    repo.link_to(
        "r",
        "extra.safetensors",
        Path::new("../../../../outside.safetensors"),
    );
    repo.link_to(
        "r",
        "abs.safetensors",
        &dir.path().join("outside.safetensors"),
    );
    let other = HubRepo::model(&hub, "org", "other");
    other.blob("theirs", 3000);
    repo.link_to(
        "r",
        "theirs.safetensors",
        Path::new("../../../models--org--other/blobs/theirs"),
    );
    // Dangling, and a loop.
    repo.link("r", "gone.safetensors", "nosuchblob");
    repo.link_to("r", "loop-a", Path::new("loop-b"));
    repo.link_to("r", "loop-b", Path::new("loop-a"));
    // A link to a directory is no file either.
    repo.link_to("r", "dir.safetensors", Path::new("../../blobs"));

    // Weights that only lead out of the repo do not make a model.
    let escaped = HubRepo::model(&hub, "org", "escaped");
    escaped.blob("cfg", 10);
    escaped.link("r", "config.json", "cfg");
    escaped.link_to(
        "r",
        "model.safetensors",
        &dir.path().join("outside.safetensors"),
    );
    escaped.refs_main("r");

    let catalog = scanned(&hub);
    assert_eq!(ids(&catalog), ["org/m"]);
    assert_eq!(catalog.models["org/m"].size_bytes, 110);
}

#[test]
fn an_incomplete_download_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    // The weights are still downloading: their blob is `.incomplete` and no link names it yet.
    let downloading = HubRepo::model(dir.path(), "org", "downloading");
    downloading.blob("cfg", 10);
    downloading.blob("w.incomplete", 40);
    downloading.link("r", "config.json", "cfg");
    downloading.refs_main("r");
    // A link to an `.incomplete` blob is no file of the model either.
    let partial = HubRepo::model(dir.path(), "org", "partial");
    partial.blob("cfg", 10);
    partial.blob("w.incomplete", 40);
    partial.link("r", "config.json", "cfg");
    partial.link("r", "model.safetensors", "w.incomplete");
    partial.refs_main("r");
    // Nothing but blobs and refs yet: no snapshot.
    let started = HubRepo::model(dir.path(), "org", "started");
    fs::remove_dir(started.dir.join("snapshots")).unwrap();
    started.blob("w.incomplete", 40);
    assert_eq!(ids(&scanned(dir.path())), Vec::<&str>::new());
}

#[test]
fn datasets_spaces_and_repos_without_a_name_are_not_models() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, org, name) in [
        ("datasets", "x", "y"),
        ("spaces", "x", "y"),
        ("models", "x", ""),
        ("models", "", ".."),
    ] {
        let repo = HubRepo::new(dir.path(), kind, org, name);
        repo.snapshot("r", 10);
        repo.refs_main("r");
    }
    assert_eq!(ids(&scanned(dir.path())), Vec::<&str>::new());
}

/// Sets the modification time of `path` to `secs` after the epoch.
fn set_mtime(path: &Path, secs: u64) {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    fs::File::open(path).unwrap().set_modified(time).unwrap();
}

#[test]
fn without_a_usable_refs_main_the_newest_complete_snapshot_serves() {
    // What refs/main says: missing, a path out of `snapshots/`, a revision that is not there,
    // an oversized file, and a revision whose download is incomplete.
    let cases: [Option<String>; 6] = [
        None,
        Some("../../models--org--other/snapshots/r".to_owned()),
        Some("..".to_owned()),
        Some("nosuchrev".to_owned()),
        Some("a".repeat(100_000)),
        Some("partial".to_owned()),
    ];
    for refs_main in cases {
        let dir = tempfile::tempdir().unwrap();
        let repo = HubRepo::model(dir.path(), "org", "m");
        repo.snapshot("older", 10);
        repo.snapshot("newer", 20);
        repo.snapshot("oldest", 30);
        repo.blob("cfg", 10);
        repo.link("partial", "config.json", "cfg");
        set_mtime(&repo.snapshot_dir("oldest"), 1_000);
        set_mtime(&repo.snapshot_dir("older"), 2_000);
        set_mtime(&repo.snapshot_dir("newer"), 3_000);
        set_mtime(&repo.snapshot_dir("partial"), 4_000);
        if let Some(text) = &refs_main {
            repo.refs_main(text);
        }
        let other = HubRepo::model(dir.path(), "org", "other");
        other.snapshot("r", 5);
        other.refs_main("r");
        let catalog = scanned(dir.path());
        assert_eq!(
            catalog.models["org/m"].path,
            repo.snapshot_dir("newer"),
            "refs/main {:?}",
            refs_main.as_deref().map(|t| &t[..t.len().min(40)])
        );
    }
}

#[test]
fn the_only_snapshot_serves_without_refs_main() {
    let dir = tempfile::tempdir().unwrap();
    let repo = HubRepo::model(dir.path(), "org", "m");
    repo.snapshot("only", 10);
    let catalog = scanned(dir.path());
    assert_eq!(catalog.models["org/m"].path, repo.snapshot_dir("only"));
}

#[test]
fn a_snapshot_that_is_a_link_is_not_walked() {
    // The cache's snapshots are directories; a linked one could lead anywhere.
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere/org/m");
    plain_model(&elsewhere, 1);
    let hub = dir.path().join("hub");
    let repo = HubRepo::model(&hub, "org", "m");
    std::os::unix::fs::symlink(&elsewhere, repo.snapshot_dir("r")).unwrap();
    repo.refs_main("r");
    assert_eq!(ids(&scanned(&hub)), Vec::<&str>::new());
}

// Several model directories.

#[test]
fn the_first_directory_to_have_an_id_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    plain_model(&models.join("org/m"), 1);
    plain_model(&models.join("org/lms"), 2);
    let hub = dir.path().join("hub");
    // The same id in the cache, and a model only the cache has.
    let repo = HubRepo::model(&hub, "org", "m");
    repo.snapshot("r", 100);
    repo.refs_main("r");
    let only = HubRepo::model(&hub, "org", "cached");
    only.snapshot("r", 5);
    only.refs_main("r");
    let missing = dir.path().join("missing");

    let catalog = scan(&[missing.clone(), models.clone(), hub.clone()]).unwrap();
    assert_eq!(ids(&catalog), ["org/cached", "org/lms", "org/m"]);
    assert_eq!(catalog.models["org/m"].path, models.join("org/m"));
    assert_eq!(catalog.models["org/cached"].size_bytes, 15);
    assert_eq!(catalog.total_size_bytes(), 2 + 3 + 15);

    // In the other order, the cache's serves.
    let catalog = scan(&[hub.clone(), models.clone(), missing]).unwrap();
    assert_eq!(catalog.models["org/m"].path, repo.snapshot_dir("r"));
    assert_eq!(catalog.models["org/m"].size_bytes, 110);
    // A directory listed twice is scanned once.
    assert_eq!(
        scan(&[hub.clone(), hub]).unwrap(),
        scanned(&dir.path().join("hub"))
    );
}

#[test]
fn the_first_of_two_models_with_one_id_in_one_directory_serves() {
    let dir = tempfile::tempdir().unwrap();
    plain_model(&dir.path().join("a/org/m"), 1);
    plain_model(&dir.path().join("b/org/m"), 1);
    let catalog = scanned(dir.path());
    assert_eq!(catalog.models["org/m"].path, dir.path().join("a/org/m"));
}

#[test]
fn a_directory_that_cannot_be_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Not a directory: it cannot be listed.
    let file = dir.path().join("file");
    touch(&file, 1);
    let err = scan(&[dir.path().to_owned(), file.clone()]).unwrap_err();
    assert!(
        matches!(&err, ScanError::Root { path, .. } if *path == file),
        "{err}"
    );
}
