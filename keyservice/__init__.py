"""keyservice: a self-hosted key management service speaking the AWS KMS wire protocol."""
