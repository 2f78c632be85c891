with

source as (

    select * from {{ source('ops', 'contacts') }}

),

renamed as (

    select
        contact_id,
        external_id,
        nullif(trim(first_name), '') as first_name,
        nullif(trim(last_name), '') as last_name,
        gender,
        cast(birth_date as date) as birth_date,
        lower(nullif(trim(email), '')) as email,
        nullif(trim(city), '') as city,
        nullif(trim(region), '') as region,
        nullif(time_zone, '') as time_zone,
        phone_raw,
        phone_e164,
        phone_valid = 1 as phone_valid,
        phone_reason,
        number_type,
        phone_country as country,
        nullif(phone_time_zones, '') as phone_time_zones,
        attributes,
        cast(created_at as timestamp) as created_at,
        cast(updated_at as timestamp) as updated_at

    from source

)

select * from renamed
