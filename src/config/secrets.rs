//! Secrets and credential files named by the configuration: a secret is given inline or in a
//! small regular file (at most [`SECRET_FILE_BYTES_MAX`] bytes), never both; certificate and
//! `.creds` files must be readable. Secret values never appear in messages.

use std::path::Path;

use super::ConfigError;
use super::resolve::invalid;
use crate::limits::SECRET_FILE_BYTES_MAX;

/// A secret given inline or in a file (trimmed); both at once is an error.
pub(super) fn secret_from(
    key: &str,
    inline: Option<String>,
    file: Option<&Path>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(key, "is given both inline and as a file")),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(key, path).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads a secret file of at most [`SECRET_FILE_BYTES_MAX`] bytes. Only a regular file is
/// read: a device (`/dev/zero`), a pipe or a socket would not end, or not report its size;
/// the read itself is bounded too, since some regular files (`/proc`) report size 0.
fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| invalid(key, format!("cannot read {}: {e}", path.display()));
    let too_big = || {
        invalid(
            key,
            format!("{} is over {SECRET_FILE_BYTES_MAX} bytes", path.display()),
        )
    };
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(invalid(
            key,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > SECRET_FILE_BYTES_MAX {
        return Err(too_big());
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(SECRET_FILE_BYTES_MAX + 1).read_to_string(&mut text))
        .map_err(cannot)?;
    if text.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(too_big());
    }
    Ok(text.trim().to_owned())
}

/// Checks that a file the connection reads later (a certificate, a key, a `.creds` file) is there.
pub(super) fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}
