//! Build and run Ally under an emulator.
