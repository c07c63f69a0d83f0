"""Process-wide basics every layer may use: the user-input exceptions, the console, the process group, the allocator."""
