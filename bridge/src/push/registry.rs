//! What the enqueue path needs to know without touching the disk: which
//! users have a device on a configured provider, and which conversations
//! each user muted. Mirrors the `device` and `mute` column families.

use std::collections::{HashMap, HashSet};

use chatmq_storage::{StorageError, Store};

use super::Platform;

pub(super) struct Registry {
    /// Platforms with a provider; devices on others are not counted.
    platforms: Vec<Platform>,
    /// Devices per user, on configured platforms.
    devices: HashMap<String, usize>,
    muted: HashSet<(String, String)>,
}

impl Registry {
    pub(super) fn load(store: &Store, platforms: &[Platform]) -> Result<Registry, StorageError> {
        let mut registry = Registry {
            platforms: platforms.to_vec(),
            devices: HashMap::new(),
            muted: store.all_mutes()?.into_iter().collect(),
        };
        for (user, device) in store.all_devices()? {
            if let Some(p) = Platform::parse(&device.platform) {
                registry.add(&user, p);
            }
        }
        Ok(registry)
    }

    pub(super) fn add(&mut self, user: &str, platform: Platform) {
        if self.platforms.contains(&platform) {
            *self.devices.entry(user.to_string()).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, user: &str, platform: Platform) {
        if !self.platforms.contains(&platform) {
            return;
        }
        if let Some(n) = self.devices.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.devices.remove(user);
            }
        }
    }

    pub(super) fn has_device(&self, user: &str) -> bool {
        self.devices.contains_key(user)
    }

    pub(super) fn set_muted(&mut self, user: &str, conv: &str, muted: bool) {
        let key = (user.to_string(), conv.to_string());
        if muted {
            self.muted.insert(key);
        } else {
            self.muted.remove(&key);
        }
    }

    pub(super) fn is_muted(&self, user: &str, conv: &str) -> bool {
        self.muted.contains(&(user.to_string(), conv.to_string()))
    }
}
