"""Object storage: URLs (`s3://BUCKET/PREFIX`, and what mosaicml-streaming reads), the clients installed for
them, reading, writing, listing and deleting objects with retries.  A layer beside files.py: it imports only
errors.py, and every layer above may use it.

    url.py          is_url, child, the scheme's client (one line when none is installed), StorageError
    objects.py      get/download (any scheme streaming reads), list/upload/put/delete (s3://), error lines

What is stored there lives with its format: checkpoints in a bucket in convert/remote.py (the newest complete
one, manifest.json uploaded last, download + sha256), the background upload in train/mirror.py (beside the
checkpoint manager), remote shards in data/remote.py.

The endpoint and the credentials come from the client library's own environment and config files
(`S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
`~/.aws/...`); calm-train never writes them anywhere.  A URL is never taken as a local path.
"""
