"""兼容入口：异常定义在 algorithm/errors.py（models 与 serving 共用，避免两者互相导入）。"""
from algorithm.errors import (AccuracyError, ConfigError, ContractError, InternalError,  # noqa: F401
                              MissingDependencyError, RolloutError, ServerError, ShapeError, StalledError,
                              UGTServingError, ValidationError)
