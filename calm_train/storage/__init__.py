"""Object storage: URLs (`s3://BUCKET/PREFIX`, and what mosaicml-streaming reads), the clients installed for
them, reading, writing, listing and deleting objects with retries, and the background checkpoint mirror.

    url.py          is_url, child, the scheme's client (one line when none is installed), StorageError
    objects.py      get/download (any scheme streaming reads), list/upload/put/delete (s3://), error lines
    checkpoints.py  remote checkpoints: the newest complete one (manifest.json uploaded last), download + sha256
    mirror.py       CheckpointMirror: uploads each complete local checkpoint in the background, keeps the policy

The endpoint and the credentials come from the client library's own environment and config files
(`S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
`~/.aws/...`); calm-train never writes them anywhere.  A URL is never taken as a local path.
"""
