"""DataModules and the embedded synthetic benchmark."""
from .datamodules import (DatasetMissingError, SyntheticShapesDataModule, SyntheticVolumesDataModule,
                          TorchvisionDataModule, VolumeFolderDataModule, ZooDataModule)
from .synthetic import SHAPES_2D, SHAPES_3D, SyntheticShapes, SyntheticVolumes

__all__ = ["DatasetMissingError", "SyntheticShapesDataModule", "SyntheticVolumesDataModule", "TorchvisionDataModule",
           "VolumeFolderDataModule", "ZooDataModule", "SHAPES_2D", "SHAPES_3D", "SyntheticShapes", "SyntheticVolumes"]
