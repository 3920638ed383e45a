"""The NV core: what `import nvib` is for (spec §1–12)."""
