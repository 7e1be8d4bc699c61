//! Serde helpers for fields that many peers write in more than one way.

use serde::{Deserialize, Deserializer};

/// `null` reads as the type's default, as absence does (with `#[serde(default)]`).
pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
