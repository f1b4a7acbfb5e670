from pyengine.checkpoint.checkpointer import Checkpointer
