# Findstb.cmake — finds the compiled stb library (Debian: libstb-dev, libstb.so) that flowdiff::io
# links for stb_image_write / stb_image, and its headers, included as <stb/stb_image_write.h>.
# Installed with flowdiff's package configuration, which uses it for the io component.
#
# Result: stb_FOUND, stb_LIBRARY, stb_INCLUDE_DIR and the imported target stb::stb.
find_path(stb_INCLUDE_DIR NAMES stb/stb_image_write.h DOC "the directory that holds stb/")
find_library(stb_LIBRARY NAMES stb DOC "the compiled stb library (libstb)")
mark_as_advanced(stb_INCLUDE_DIR stb_LIBRARY)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(stb REQUIRED_VARS stb_LIBRARY stb_INCLUDE_DIR)

if(stb_FOUND AND NOT TARGET stb::stb)
  add_library(stb::stb UNKNOWN IMPORTED)
  set_target_properties(stb::stb PROPERTIES IMPORTED_LOCATION "${stb_LIBRARY}"
                                            INTERFACE_INCLUDE_DIRECTORIES "${stb_INCLUDE_DIR}")
endif()
