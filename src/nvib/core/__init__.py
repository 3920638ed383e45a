"""The NV core: what `import nvib` is for (docs/method.md §1–12)."""
