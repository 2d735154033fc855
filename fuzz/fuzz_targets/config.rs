//! Config loading: any TOML text gives settings or one clear line naming
//! what is wrong, never a panic. Uses the loader without its validation
//! step, which would create the directories an input names.
#![no_main]

use chatmq_config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = Settings::from_toml_unvalidated(text) {
        let message = error.to_string();
        assert!(!message.is_empty());
        assert!(!message.contains('\n'), "not one line: {message:?}");
    }
});
