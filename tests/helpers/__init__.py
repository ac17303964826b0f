"""What the tests share: real servers, pictures, a local S3 endpoint, the diffusers oracle, CRD
schemas and the repository's paths."""
