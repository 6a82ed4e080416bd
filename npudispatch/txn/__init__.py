"""AIE transaction binaries: byte-exact codec, builder, re-basing, fusion and inspection."""
