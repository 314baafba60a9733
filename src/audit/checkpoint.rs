//! Signed checkpoints in the C2SP signed-note format: a note whose text is
//! `<origin>\n<seq>\n<base64 of the 32-byte record hash>\n`, followed by a blank line and one
//! signature line `— <key name> <base64(key id ‖ Ed25519 signature)>`, where the key id is
//! the first 4 bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key) and the signature is over
//! the note text. A reviewer holding the public key proves that an export is a prefix of the
//! chain the server signed.

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What a checkpoint states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub seq: i64,
    /// Lowercase hex, as in the records.
    pub hash: String,
}

impl Checkpoint {
    /// The origin line of a namespace's chain.
    pub fn origin_for(chain: &str) -> String {
        format!("hookwarden.audit/{chain}")
    }

    fn text(&self) -> Result<String, String> {
        let raw = hex::decode(&self.hash).map_err(|_| "the hash is not hex".to_owned())?;
        Ok(format!("{}\n{}\n{}\n", self.origin, self.seq, B64.encode(raw)))
    }
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0x0A, 0x01]);
    hasher.update(public.as_bytes());
    let digest = hasher.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Signs checkpoints with one Ed25519 key.
#[derive(Clone)]
pub struct CheckpointSigner {
    pub name: String,
    key: SigningKey,
}

impl CheckpointSigner {
    pub fn new(name: &str, seed: [u8; 32]) -> Self {
        Self { name: name.to_owned(), key: SigningKey::from_bytes(&seed) }
    }

    pub fn generate(name: &str) -> (Self, [u8; 32]) {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let seed = key.to_bytes();
        (Self { name: name.to_owned(), key }, seed)
    }

    /// The verifier key in the note format: `<name>+<key id hex>+<base64(0x01 ‖ public key)>`.
    pub fn public_key(&self) -> String {
        let public = self.key.verifying_key();
        let mut encoded = vec![0x01];
        encoded.extend_from_slice(public.as_bytes());
        format!("{}+{}+{}", self.name, hex::encode(key_id(&self.name, &public)), B64.encode(encoded))
    }

    /// The signed note.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<String, String> {
        let text = checkpoint.text()?;
        let signature = self.key.sign(text.as_bytes());
        let mut blob = key_id(&self.name, &self.key.verifying_key()).to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        Ok(format!("{text}\n— {} {}\n", self.name, B64.encode(blob)))
    }
}

/// Verifies a signed note with a verifier key (`name+id+base64`); returns what it states.
pub fn verify(note: &str, public_key: &str) -> Result<Checkpoint, String> {
    let mut parts = public_key.splitn(3, '+');
    let (name, id_hex, key_b64) = match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(i), Some(k)) => (n, i, k),
        _ => return Err("the public key must look like name+keyid+base64".into()),
    };
    let key_bytes = B64.decode(key_b64).map_err(|_| "the public key is not base64")?;
    let (alg, raw) = key_bytes.split_first().ok_or("empty public key")?;
    if *alg != 0x01 || raw.len() != 32 {
        return Err("only Ed25519 verifier keys (type 0x01) are supported".into());
    }
    let public = VerifyingKey::from_bytes(raw.try_into().expect("checked length"))
        .map_err(|e| format!("bad public key: {e}"))?;
    if hex::encode(key_id(name, &public)) != id_hex {
        return Err("the public key's id does not match its name and key".into());
    }
    let (text, signatures) = note.split_once("\n\n").ok_or("not a signed note: no blank line before the signatures")?;
    let text = format!("{text}\n");
    let prefix = format!("— {name} ");
    let line = signatures.lines().find(|l| l.starts_with(&prefix)).ok_or(format!("no signature by `{name}`"))?;
    let blob = B64.decode(&line[prefix.len()..]).map_err(|_| "the signature is not base64")?;
    if blob.len() != 68 || blob[..4] != key_id(name, &public) {
        return Err("the signature is not from this key".into());
    }
    let signature = ed25519_dalek::Signature::from_slice(&blob[4..]).map_err(|e| e.to_string())?;
    public.verify(text.as_bytes(), &signature).map_err(|_| "the checkpoint signature does not verify".to_owned())?;
    let mut lines = text.lines();
    let origin = lines.next().ok_or("no origin line")?.to_owned();
    let seq = lines.next().and_then(|l| l.parse().ok()).ok_or("no seq line")?;
    let hash = lines.next().and_then(|l| B64.decode(l).ok()).map(hex::encode).ok_or("no hash line")?;
    Ok(Checkpoint { origin, seq, hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_verifies_and_a_changed_one_does_not() {
        let (signer, _) = CheckpointSigner::generate("hookwarden-test");
        let checkpoint = Checkpoint { origin: Checkpoint::origin_for("payments"), seq: 42, hash: "ab".repeat(32) };
        let note = signer.sign(&checkpoint).unwrap();
        assert_eq!(verify(&note, &signer.public_key()).unwrap(), checkpoint);
        let forged = note.replace("\n42\n", "\n43\n");
        assert!(verify(&forged, &signer.public_key()).is_err());
        let (other, _) = CheckpointSigner::generate("hookwarden-test");
        assert!(verify(&note, &other.public_key()).is_err());
    }
}
