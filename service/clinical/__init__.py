"""The pure clinical core: plain data in, decisions out. No I/O, no clock, no logging."""
