"""kmsfs: a FUSE filesystem that encrypts every file under a data key wrapped by the key service."""
