"""兼容入口：异常定义在 algorithm/errors.py（models 与 serving 共用，避免两者互相导入）。"""
from algorithm.errors import (AccuracyError, CatalogError, ConfigError, ContractError, InternalError,  # noqa: F401
                              MissingDependencyError, ModelContractError, ModelExportError, RolloutError, ServerError, ShapeError, StalledError,
                              UGTServingError, ValidationError)
