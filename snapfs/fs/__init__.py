"""The snapfs filesystem: a plain model (:mod:`.model`), a thin pyfuse3 adapter
(:mod:`.fuse_ops`) and the mount daemon (:mod:`.mount`)."""
