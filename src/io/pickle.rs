//! PyTorch `.pt`/`.pth` state dicts through a restricted pickle reader (TODO).
