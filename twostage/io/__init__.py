"""File primitives shared by every command: atomic writes and folders written whole (`files`),
run locks (`locks`), bounded reading of JSON and YAML (`readers`) and of images (`images`), and
the collection of what native libraries print (`native`)."""
