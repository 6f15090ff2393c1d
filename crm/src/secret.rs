//! The token secret: from `CRM_TOKEN_SECRET`, else a file in the data dir,
//! generated on first use so a fresh install works with nothing to configure.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use crm_command_service::auth::MIN_SECRET_BYTES;

/// File name of the generated secret inside the data dir.
pub const SECRET_FILE: &str = "token-secret";

/// Where the secret came from.
pub enum SecretSource {
    Environment,
    ExistingFile,
    GeneratedFile(PathBuf),
}

/// Reads the secret from the environment value if given, else from (or into) the data dir.
pub fn load_or_create(
    env_secret: Option<&str>,
    data_dir: &Path,
) -> anyhow::Result<(Vec<u8>, SecretSource)> {
    if let Some(secret) = env_secret {
        if secret.len() < MIN_SECRET_BYTES {
            bail!("CRM_TOKEN_SECRET must be at least {MIN_SECRET_BYTES} bytes long");
        }
        return Ok((secret.as_bytes().to_vec(), SecretSource::Environment));
    }
    let path = data_dir.join(SECRET_FILE);
    if path.exists() {
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let secret = text.trim().as_bytes().to_vec();
        if secret.len() < MIN_SECRET_BYTES {
            bail!(
                "{} holds a secret shorter than {MIN_SECRET_BYTES} bytes",
                path.display()
            );
        }
        return Ok((secret, SecretSource::ExistingFile));
    }
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((secret.into_bytes(), SecretSource::GeneratedFile(path)))
}

/// Writes a file only its owner may read; never replaces one written meanwhile.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_is_reused_on_the_next_start() {
        let dir = std::env::temp_dir().join(format!("crm-secret-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (first, source) = load_or_create(None, &dir).unwrap();
        assert!(matches!(source, SecretSource::GeneratedFile(_)));
        let (second, source) = load_or_create(None, &dir).unwrap();
        assert!(matches!(source, SecretSource::ExistingFile));
        assert_eq!(first, second);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_short_environment_secret_is_refused() {
        assert!(load_or_create(Some("too-short"), Path::new("/nonexistent")).is_err());
    }
}
